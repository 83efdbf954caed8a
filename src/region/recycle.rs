//! The recycle bin's files in a region:
//!
//! ```text
//! recycle-bin/rules/<rule>.json        retention rules
//! recycle-bin/snapshots/<snap>.json    a binned snapshot's entry (written first)
//! recycle-bin/snapshots/<snap>         its manifest, as it was under snapshots/
//! recycle-bin/images/<ami>.json        a binned image's entry (the image
//!                                      itself stays in images/, deregistered)
//! ```
//!
//! Reading, listing and writing them; what the bin means is in
//! `ops::recycle`.

use crate::error::{Error, Result};
use crate::format::lifecycle::{
    BinEntry, MAX_RECORD, ResourceType, RetentionRule, decode_bin_entry, decode_rule,
    encode_bin_entry, encode_rule,
};
use crate::id::RuleId;
use crate::region::catalog::Region;

pub fn rule_key(id: &RuleId) -> String {
    format!("recycle-bin/rules/{id}.json")
}

fn kind_dir(kind: ResourceType) -> &'static str {
    match kind {
        ResourceType::EbsSnapshot => "recycle-bin/snapshots",
        ResourceType::Ec2Image => "recycle-bin/images",
    }
}

pub fn entry_key(kind: ResourceType, id: &str) -> String {
    format!("{}/{id}.json", kind_dir(kind))
}

/// Every retention rule of the region, of all accounts. One that cannot
/// be read is an error: it might keep what is about to be deleted.
pub fn rules(region: &Region) -> Result<Vec<RetentionRule>> {
    let backend = region.backend();
    let mut out = Vec::new();
    for name in backend.list("recycle-bin/rules")? {
        let Some(id) = name.strip_suffix(".json").and_then(|n| n.parse().ok()) else {
            continue;
        };
        if let Some(rule) = read_rule(region, &id)? {
            out.push(rule);
        }
    }
    out.sort_by(|a, b| (&a.date_created, &a.identifier).cmp(&(&b.date_created, &b.identifier)));
    Ok(out)
}

pub fn read_rule(region: &Region, id: &RuleId) -> Result<Option<RetentionRule>> {
    let key = rule_key(id);
    let backend = region.backend();
    let Some(bytes) = backend.read(&key, "retention rule", MAX_RECORD)? else {
        return Ok(None);
    };
    let rule = decode_rule(&bytes, &backend.locate(&key))?;
    if &rule.identifier != id {
        return Err(Error::CorruptFile {
            what: "retention rule",
            location: backend.locate(&key),
            reason: format!("it describes {} instead", rule.identifier),
        });
    }
    Ok(Some(rule))
}

pub fn write_rule(region: &Region, rule: &RetentionRule) -> Result<()> {
    region
        .backend()
        .replace(&rule_key(&rule.identifier), &encode_rule(rule))
}

pub fn remove_rule(region: &Region, id: &RuleId) -> Result<()> {
    region.backend().remove(&rule_key(id))?;
    Ok(())
}

/// The bin entries of `kind` (whether or not the move they began
/// finished: see `ops::recycle`).
pub fn entries(region: &Region, kind: ResourceType) -> Result<Vec<BinEntry>> {
    let mut out = Vec::new();
    for name in region.backend().list(kind_dir(kind))? {
        let Some(id) = name.strip_suffix(".json") else {
            continue;
        };
        if let Some(e) = read_entry(region, kind, id)? {
            out.push(e);
        }
    }
    out.sort_by(|a, b| (&a.recycle_bin_enter_time, &a.id).cmp(&(&b.recycle_bin_enter_time, &b.id)));
    Ok(out)
}

pub fn read_entry(region: &Region, kind: ResourceType, id: &str) -> Result<Option<BinEntry>> {
    let key = entry_key(kind, id);
    let backend = region.backend();
    let Some(bytes) = backend.read(&key, "recycle bin entry", MAX_RECORD)? else {
        return Ok(None);
    };
    let entry = decode_bin_entry(&bytes, &backend.locate(&key))?;
    if entry.id != id || entry.resource_type != kind {
        return Err(Error::CorruptFile {
            what: "recycle bin entry",
            location: backend.locate(&key),
            reason: format!(
                "it describes {} {} instead",
                entry.resource_type.noun(),
                entry.id
            ),
        });
    }
    Ok(Some(entry))
}

pub fn write_entry(region: &Region, entry: &BinEntry) -> Result<()> {
    region.backend().replace(
        &entry_key(entry.resource_type, &entry.id),
        &encode_bin_entry(entry),
    )
}

pub fn remove_entry(region: &Region, kind: ResourceType, id: &str) -> Result<()> {
    region.backend().remove(&entry_key(kind, id))?;
    Ok(())
}
