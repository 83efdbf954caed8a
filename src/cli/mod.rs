//! The `blocksnap` command line: one file per noun (`snapshot`, `volume`,
//! `store`, `region`, `image`, `instance`, `key`, `policy`,
//! `recycle_bin`, `account` with `serve`), each holding its clap
//! definitions and the glue to the library; [`app`] the global options
//! and the dispatch; [`parse`] value parsers; [`output`] how results print;
//! [`exit`] exit codes. The CLI parses and prints: every rule lives in the
//! library.

pub mod account;
pub mod app;
pub mod exit;
pub mod image;
pub mod instance;
pub mod key;
pub mod output;
pub mod parse;
pub mod policy;
pub mod recycle_bin;
pub mod region;
pub mod remote;
pub mod snapshot;
pub mod store;
pub mod volume;
