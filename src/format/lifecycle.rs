//! The lifecycle's records, each in the JSON envelope (frozen: a new field
//! or meaning is a new version):
//!
//! - `policies/<policy>.json`: a snapshot or image policy (EBS Data
//!   Lifecycle Manager), [`Policy`];
//! - `policies/<policy>.state.json`: what its runs did, [`PolicyState`];
//! - `recycle-bin/rules/<rule>.json`: a retention rule, [`RetentionRule`];
//! - `recycle-bin/snapshots/<snap>.json`, `recycle-bin/images/<ami>.json`:
//!   an object in the recycle bin, [`BinEntry`] (a binned snapshot's
//!   manifest lies beside it, byte for byte as it was, at
//!   `recycle-bin/snapshots/<snap>`).
//!
//! Times are RFC 3339 UTC strings, as EC2 writes them.

use serde::{Deserialize, Serialize};

use crate::error::{Location, Result};
use crate::format::envelope;
use crate::format::manifest::Tag;
use crate::id::{AccountId, PolicyId, RuleId};

pub const POLICY_FORMAT: &str = "blocksnap-lifecycle-policy";
pub const POLICY_STATE_FORMAT: &str = "blocksnap-lifecycle-policy-state";
pub const RULE_FORMAT: &str = "blocksnap-retention-rule";
pub const BIN_ENTRY_FORMAT: &str = "blocksnap-recycle-bin-entry";
/// The longest lifecycle record read.
pub const MAX_RECORD: u64 = 1 << 20;

/// What a policy snapshots: a volume path or an instance directory
/// (absolute).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum PolicyTarget {
    Volume(String),
    Instance(String),
}

impl PolicyTarget {
    pub fn path(&self) -> &str {
        match self {
            PolicyTarget::Volume(p) | PolicyTarget::Instance(p) => p,
        }
    }
}

impl std::fmt::Display for PolicyTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PolicyTarget::Volume(p) => write!(f, "volume {p}"),
            PolicyTarget::Instance(p) => write!(f, "instance {p}"),
        }
    }
}

/// How many of what a policy made it keeps, per target.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Retain {
    /// The newest N.
    Count(u32),
    /// Those scheduled less than this many seconds ago (and always the
    /// newest).
    AgeSeconds(u64),
}

/// Cross-region copies and how many of them are kept.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct CrossRegionCopy {
    pub target_region: String,
    pub retain_count: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum PolicyStatus {
    Enabled,
    Disabled,
}

/// A lifecycle policy (DLM's `LifecyclePolicy`, in blocksnap's terms).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct Policy {
    pub policy_id: PolicyId,
    pub name: String,
    pub owner_id: AccountId,
    pub state: PolicyStatus,
    pub targets: Vec<PolicyTarget>,
    /// `1h`, `30m`, `1d` (slots counted from the Unix epoch, UTC) or
    /// `cron(M H DOM MON DOW)` (UTC).
    pub schedule: String,
    pub retain: Retain,
    /// Make an image of each target (an instance's volumes, or a volume
    /// as `/dev/xvda`) rather than only snapshots.
    pub create_image: bool,
    pub image_name_prefix: Option<String>,
    pub copy: Option<CrossRegionCopy>,
    /// Tags added to every snapshot and image it makes.
    pub tags: Vec<Tag>,
    pub date_created: String,
}

/// How one target fared in a run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct TargetOutcome {
    pub target: PolicyTarget,
    /// `succeeded` or `failed`.
    pub outcome: String,
    /// What it made: snapshot and image ids (copies included).
    pub created: Vec<String>,
    /// What retention deleted (or moved to the recycle bin).
    pub deleted: Vec<String>,
    pub error: Option<String>,
}

/// The last run of a policy.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct PolicyRun {
    /// The scheduled time it ran for.
    pub slot: String,
    pub started: String,
    pub finished: String,
    /// `succeeded`, `partial` (some targets failed) or `failed`.
    pub outcome: String,
    pub targets: Vec<TargetOutcome>,
}

/// What a policy's runs did: rewritten at the end of each run.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct PolicyState {
    /// The newest slot whose run finished; a slot is run once.
    pub completed_slot: Option<String>,
    pub last_run: Option<PolicyRun>,
}

/// The kind of object a retention rule keeps (AWS's `ResourceType`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ResourceType {
    #[serde(rename = "EBS_SNAPSHOT")]
    EbsSnapshot,
    #[serde(rename = "EC2_IMAGE")]
    Ec2Image,
}

impl ResourceType {
    pub fn noun(self) -> &'static str {
        match self {
            ResourceType::EbsSnapshot => "snapshot",
            ResourceType::Ec2Image => "image",
        }
    }
}

/// A rule lock: while locked, the rule cannot be deleted nor its retention
/// shortened; unlocking takes `unlock_delay_seconds`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct RuleLock {
    pub unlock_delay_seconds: u64,
    /// Set by `rule unlock`: the rule stays locked until then.
    pub unlock_at: Option<String>,
}

/// A Recycle Bin retention rule.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct RetentionRule {
    pub identifier: RuleId,
    pub owner_id: AccountId,
    pub resource_type: ResourceType,
    pub retention_seconds: u64,
    /// Empty: every object of the owner (a region-level rule); else
    /// objects with any of these tags (an empty value matches any value).
    pub resource_tags: Vec<Tag>,
    pub description: String,
    pub lock: Option<RuleLock>,
    pub date_created: String,
}

/// An object in the recycle bin.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct BinEntry {
    pub resource_type: ResourceType,
    /// The snapshot or image id.
    pub id: String,
    pub owner_id: AccountId,
    pub recycle_bin_enter_time: String,
    pub recycle_bin_exit_time: String,
    /// The rule that kept it.
    pub rule: RuleId,
}

pub fn encode_policy(p: &Policy) -> Vec<u8> {
    envelope::encode(POLICY_FORMAT, p)
}

pub fn decode_policy(bytes: &[u8], at: &Location) -> Result<Policy> {
    envelope::decode(bytes, POLICY_FORMAT, "lifecycle policy", at)
}

pub fn encode_policy_state(s: &PolicyState) -> Vec<u8> {
    envelope::encode(POLICY_STATE_FORMAT, s)
}

pub fn decode_policy_state(bytes: &[u8], at: &Location) -> Result<PolicyState> {
    envelope::decode(bytes, POLICY_STATE_FORMAT, "lifecycle policy state", at)
}

pub fn encode_rule(r: &RetentionRule) -> Vec<u8> {
    envelope::encode(RULE_FORMAT, r)
}

pub fn decode_rule(bytes: &[u8], at: &Location) -> Result<RetentionRule> {
    envelope::decode(bytes, RULE_FORMAT, "retention rule", at)
}

pub fn encode_bin_entry(e: &BinEntry) -> Vec<u8> {
    envelope::encode(BIN_ENTRY_FORMAT, e)
}

pub fn decode_bin_entry(bytes: &[u8], at: &Location) -> Result<BinEntry> {
    envelope::decode(bytes, BIN_ENTRY_FORMAT, "recycle bin entry", at)
}
