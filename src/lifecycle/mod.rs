//! Lifecycle policies, the top room: [`schedule`] (intervals and cron
//! expressions, in UTC) and [`policy`] (policies, `policy run`, retention
//! and cross-region copies), built out of the image and snapshot
//! operations below. Prune and the recycle bin are in `ops` (`prune`,
//! `recycle`), where snapshot deletion is.

pub mod policy;
pub mod schedule;
