//! What the binary prints: short text for people, or with `--json` one
//! document in the AWS CLI's shapes and key names; and the progress bar.

use std::io::IsTerminal;
use std::time::SystemTime;

use indicatif::{ProgressBar, ProgressStyle};
use serde_json::{Value, json};

use blocksnap::format::image::LaunchPermission;
use blocksnap::format::manifest::{Block, Manifest, SnapshotMeta, Tag};
use blocksnap::format::regions::RegionDef;
use blocksnap::id::hex;
use blocksnap::ops::access::Deleted;
use blocksnap::ops::check::{BadChunk, RegionStats, VerifyReport};
use blocksnap::ops::gc::GcReport;
use blocksnap::ops::prune::PruneReport;
use blocksnap::ops::restore::RestoreReport;
use blocksnap::ops::snapshot::ChangedBlock;
use blocksnap::ops::snapshot::Incremental;
use blocksnap::ops::verify::VolumeCheck;
use blocksnap::progress::Progress;
use blocksnap::region::images::ImageView;
use blocksnap::region::permissions::Grants;
use blocksnap::{Region, SnapshotId};

pub struct Out {
    pub json: bool,
    quiet: bool,
    bars: bool,
    /// The region acted on, to name keys by their ARNs.
    region: Option<std::sync::Arc<Region>>,
    key_arns: std::cell::RefCell<std::collections::HashMap<blocksnap::id::KeyId, String>>,
}

impl Out {
    pub fn new(json: bool, quiet: bool) -> Self {
        Out {
            json,
            quiet,
            bars: !json && !quiet && std::io::stderr().is_terminal(),
            region: None,
            key_arns: Default::default(),
        }
    }

    /// `--json`: one JSON document.
    pub fn json(&self) -> bool {
        self.json
    }

    /// `--quiet`: print only what matters.
    pub fn quiet(&self) -> bool {
        self.quiet
    }

    pub fn set_region(&mut self, region: std::sync::Arc<Region>) {
        self.region = Some(region);
    }

    /// The ARN of key `id`, as EC2 shows a snapshot's `KmsKeyId`: each key
    /// read once, however many snapshots a listing shows under it.
    fn key_arn(&self, id: &blocksnap::id::KeyId) -> String {
        let mut arns = self.key_arns.borrow_mut();
        arns.entry(*id)
            .or_insert_with(|| {
                let found = self.region.as_ref().and_then(|r| {
                    let keys = r.keys();
                    keys.resolve(&id.to_string()).ok().map(|rec| keys.arn(&rec))
                });
                found.unwrap_or_else(|| id.to_string())
            })
            .clone()
    }

    fn snapshot_json(&self, m: &SnapshotMeta) -> Value {
        let mut doc = snapshot_json(m);
        doc["Encrypted"] = json!(m.kms_key_id.is_some());
        if let Some(k) = &m.kms_key_id {
            doc["KmsKeyId"] = json!(self.key_arn(k));
        }
        doc
    }

    /// A progress bar on a terminal; nothing when piped, quiet or `--json`.
    pub fn progress(&self) -> Bar {
        Bar(self.bars.then(|| {
            let pb = ProgressBar::new(0);
            pb.set_style(
                ProgressStyle::with_template(
                    "{msg} [{bar:24}] {bytes}/{total_bytes} {binary_bytes_per_sec} {eta}",
                )
                .expect("valid template")
                .progress_chars("=> "),
            );
            pb
        }))
    }

    pub fn print(&self, doc: Value) {
        println!(
            "{}",
            serde_json::to_string_pretty(&doc).expect("json serializes")
        );
    }

    pub fn snapshot_created(&self, m: &SnapshotMeta) {
        if self.json {
            return self.print(self.snapshot_json(m));
        }
        let s = &m.stats;
        match &m.parent {
            Some(p) => println!(
                "{} created from {} (incremental, parent {p})",
                m.id, m.source
            ),
            None => println!("{} created from {} (full)", m.id, m.source),
        }
        println!(
            "  volume {} in {} blocks of {}: {} data, {} zero, {} hole",
            human(m.volume_size),
            m.block_count(),
            human(m.block_size as u64),
            s.data_blocks,
            s.zero_blocks,
            s.hole_blocks
        );
        println!(
            "  stored {} new chunks: {} of blocks in {}; reused {} ({} blocks unchanged from the parent)",
            s.new_chunks,
            human(s.new_bytes_raw),
            human(s.new_bytes_stored),
            human(s.reused_bytes),
            s.unchanged_blocks
        );
    }

    /// A snapshot of a lazy volume: also what it read and took unread.
    pub fn incremental_created(&self, s: &Incremental) {
        if self.json {
            let mut v = self.snapshot_json(&s.meta);
            v["BlocksRead"] = s.blocks_read.into();
            v["BlocksTaken"] = s.blocks_taken.into();
            return self.print(v);
        }
        self.snapshot_created(&s.meta);
        println!(
            "  read {} blocks marked dirty; took {} from the parent unread",
            s.blocks_read, s.blocks_taken
        );
    }

    pub fn snapshot_list(&self, snaps: &[SnapshotMeta]) {
        if self.json {
            return self.print(
                json!({ "Snapshots": snaps.iter().map(|m| self.snapshot_json(m)).collect::<Vec<_>>() }),
            );
        }
        if snaps.is_empty() {
            println!("no snapshots");
            return;
        }
        table(
            &[
                ("snapshot", 22),
                ("started", 20),
                ("size", -10),
                ("new", -10),
                ("parent", 22),
            ],
            "source",
            snaps.iter().map(|m| {
                (
                    vec![
                        m.id.to_string(),
                        humantime::format_rfc3339_seconds(m.created()).to_string(),
                        human(m.volume_size),
                        if m.sealed {
                            "?".into()
                        } else {
                            human(m.stats.new_bytes_stored)
                        },
                        m.parent.as_ref().map_or("-".into(), SnapshotId::to_string),
                    ],
                    shown_source(m),
                )
            }),
        );
    }

    /// `image list`: `json` shapes one image for `--json`.
    pub fn image_list(&self, shown: &[ImageView], json: impl Fn(&ImageView) -> Value) {
        if self.json {
            return self.print(json!({ "Images": shown.iter().map(json).collect::<Vec<_>>() }));
        }
        if shown.is_empty() {
            println!("no images");
            return;
        }
        let now = SystemTime::now();
        table(
            &[
                ("image", 21),
                ("owner", 12),
                ("state", 13),
                ("public", 8),
                ("devices", 7),
            ],
            "name",
            shown.iter().map(|v| {
                let state = if v.is_deprecated(now) {
                    "deprecated"
                } else {
                    v.state.state.as_str()
                };
                let public = if v.permissions.is_public() {
                    "yes"
                } else {
                    "no"
                };
                (
                    vec![
                        v.image.image_id.to_string(),
                        v.image.owner_id.to_string(),
                        state.to_string(),
                        public.to_string(),
                        v.image.block_device_mappings.len().to_string(),
                    ],
                    v.image.name.clone(),
                )
            }),
        );
    }

    /// A snapshot's or image's tags, after a tag command.
    pub fn tags(&self, resource: &str, tags: &[Tag]) {
        if self.json {
            return self.print(json!({ "ResourceId": resource, "Tags": tags }));
        }
        match tags {
            [] => println!("{resource} has no tags"),
            _ => {
                let shown: Vec<String> = tags
                    .iter()
                    .map(|t| format!("{}={}", t.key, t.value))
                    .collect();
                println!("{resource} tags: {}", shown.join(", "));
            }
        }
    }

    pub fn snapshot_describe(&self, m: &SnapshotMeta) {
        if self.json {
            return self.print(json!({ "Snapshots": [self.snapshot_json(m)] }));
        }
        let s = &m.stats;
        let tags: Vec<String> = m
            .tags
            .iter()
            .map(|t| format!("{}={}", t.key, t.value))
            .collect();
        println!("SnapshotId        {}", m.id);
        println!(
            "StartTime         {}",
            humantime::format_rfc3339_seconds(m.created())
        );
        println!("State             completed");
        println!("OwnerId           {}", m.owner);
        println!("Source            {}", shown_source(m));
        println!(
            "VolumeSize        {} ({} bytes)",
            human(m.volume_size),
            m.volume_size
        );
        println!("BlockSize         {}", human(m.block_size as u64));
        println!(
            "Encrypted         {}",
            match &m.kms_key_id {
                Some(k) => format!("yes, key {}", self.key_arn(k)),
                None => "no".into(),
            }
        );
        println!(
            "Parent            {}",
            m.parent.as_ref().map(SnapshotId::as_str).unwrap_or("-")
        );
        if m.sealed {
            println!("Description, tags, digest and counts: {SEALED_NOTE}");
            return;
        }
        println!("Description       {}", m.description);
        println!("Tags              {}", tags.join(", "));
        println!("RootDigest        {}", hex(&m.root_digest));
        println!(
            "Blocks            {} data, {} zero, {} hole ({} unchanged from parent)",
            s.data_blocks, s.zero_blocks, s.hole_blocks, s.unchanged_blocks
        );
        println!(
            "New to the store  {} chunks, {} raw, {} stored",
            s.new_chunks,
            human(s.new_bytes_raw),
            human(s.new_bytes_stored)
        );
        println!("Reused            {}", human(s.reused_bytes));
    }

    pub fn blocks(&self, m: &Manifest) {
        if self.json {
            let blocks: Vec<Value> = m
                .blocks
                .iter()
                .enumerate()
                .map(|(i, b)| json!({ "BlockIndex": i, "State": b.state_name(), "Checksum": checksum(b) }))
                .collect();
            return self.print(json!({
                "SnapshotId": m.meta.id.as_str(),
                "VolumeSize": blocksnap::format::image::gib_for(m.meta.volume_size),
                "VolumeSizeBytes": m.meta.volume_size,
                "BlockSize": m.meta.block_size,
                "Blocks": blocks,
            }));
        }
        let mut out = String::new();
        for (i, b) in m.blocks.iter().enumerate() {
            let digest = b.chunk().map(|c| c.to_hex()).unwrap_or_else(|| "-".into());
            out.push_str(&format!("{i:>10} {:<5} {digest}\n", b.state_name()));
        }
        print!("{out}");
    }

    pub fn changed_blocks(&self, a: &Manifest, b: &Manifest, changed: &[ChangedBlock]) {
        if self.json {
            let blocks: Vec<Value> = changed
                .iter()
                .map(|c| {
                    json!({
                        "BlockIndex": c.index,
                        "FirstBlockChecksum": c.first.as_ref().and_then(checksum),
                        "SecondBlockChecksum": c.second.as_ref().and_then(checksum),
                    })
                })
                .collect();
            return self.print(json!({
                "FirstSnapshotId": a.meta.id.as_str(),
                "SecondSnapshotId": b.meta.id.as_str(),
                "BlockSize": a.meta.block_size,
                "VolumeSize": blocksnap::format::image::gib_for(b.meta.volume_size),
                "VolumeSizeBytes": b.meta.volume_size,
                "ChangedBlocks": blocks,
            }));
        }
        let mut out = String::new();
        for c in changed {
            let state = |b: &Option<Block>| b.map(|b| b.state_name()).unwrap_or("none");
            out.push_str(&format!(
                "{:>10} {} -> {}\n",
                c.index,
                state(&c.first),
                state(&c.second)
            ));
        }
        print!("{out}");
        eprintln!(
            "{} of {} blocks differ",
            changed.len(),
            a.blocks.len().max(b.blocks.len())
        );
    }

    pub fn deleted(&self, id: &SnapshotId, done: &Deleted) {
        match done {
            Deleted::Removed if self.json => {
                self.print(json!({ "SnapshotId": id.as_str(), "Deleted": true }))
            }
            Deleted::Removed => println!(
                "{id} deleted; run `blocksnap store gc` to reclaim chunks no other snapshot uses"
            ),
            Deleted::Binned(e) if self.json => self.print(json!({
                "SnapshotId": id.as_str(),
                "Deleted": true,
                "RecycleBin": bin_entry_json(e),
            })),
            Deleted::Binned(e) => println!(
                "{id} moved to the recycle bin until {} (rule {}); `blocksnap snapshot \
                 restore-from-recycle-bin {id}` brings it back",
                e.recycle_bin_exit_time, e.rule
            ),
        }
    }

    /// What `snapshot prune` kept and removed, and why.
    pub fn pruned(&self, source: &str, r: &PruneReport, dry_run: bool) {
        let removed = |m: &SnapshotMeta| {
            if dry_run {
                return "would be removed".to_string();
            }
            match r.deleted.iter().find(|(d, _)| d.id == m.id) {
                Some((_, Deleted::Removed)) => "removed".to_string(),
                Some((_, Deleted::Binned(e))) => {
                    format!("moved to the recycle bin until {}", e.recycle_bin_exit_time)
                }
                None => match r.failed.iter().find(|(d, _)| d.id == m.id) {
                    Some((_, e)) => format!("not removed: {e}"),
                    None => "removed".to_string(),
                },
            }
        };
        if self.json {
            let decisions: Vec<Value> = r
                .decisions
                .iter()
                .map(|d| {
                    json!({
                        "SnapshotId": d.meta.id.as_str(),
                        "StartTime": start_time(&d.meta),
                        "Keep": d.keep(),
                        "Reasons": d.reasons,
                        "Outcome": if d.keep() { "kept".to_string() } else { removed(&d.meta) },
                    })
                })
                .collect();
            let held: Vec<Value> = r
                .held
                .iter()
                .map(|(m, why)| json!({"SnapshotId": m.id.as_str(), "Reason": why}))
                .collect();
            return self.print(json!({
                "Volume": source,
                "DryRun": dry_run,
                "Snapshots": decisions,
                "Held": held,
                "SealedNotJudged": r.sealed,
            }));
        }
        let kept = r.decisions.iter().filter(|d| d.keep()).count();
        println!(
            "{source}: keep {kept} of {} snapshots{}",
            r.decisions.len(),
            if dry_run { " (dry run)" } else { "" }
        );
        for d in &r.decisions {
            let what = match d.keep() {
                true => format!("keep    ({})", d.reasons.join(", ")),
                false => removed(&d.meta),
            };
            println!("  {}  {}  {what}", d.meta.id, start_time(&d.meta));
        }
        for (m, why) in &r.held {
            println!("  {}  {}  keep    ({why})", m.id, start_time(m));
        }
        if r.sealed > 0 {
            eprintln!(
                "blocksnap: note: {} encrypted snapshots of yours were not judged: their source is \
                 sealed and their key is not at hand (give the passphrase to include them)",
                r.sealed
            );
        }
        if !dry_run && r.deleted.iter().any(|(_, d)| matches!(d, Deleted::Removed)) {
            println!("run `blocksnap store gc` to reclaim chunks no other snapshot uses");
        }
    }

    pub fn restore(&self, r: &RestoreReport) {
        if self.json {
            return self.print(json!({
                "SnapshotId": r.snapshot.as_str(),
                "Target": r.target.display().to_string(),
                "Size": blocksnap::format::image::gib_for(r.target_size),
                "SizeBytes": r.target_size,
                "Delta": r.delta,
                "BlocksWritten": r.blocks_written,
                "BlocksSkipped": r.blocks_skipped,
                "BytesWritten": r.bytes_written,
            }));
        }
        println!(
            "{} restored to {} ({}): {} blocks written ({}), {} skipped",
            r.snapshot,
            r.target.display(),
            human(r.target_size),
            r.blocks_written,
            human(r.bytes_written),
            r.blocks_skipped
        );
    }

    pub fn volume_check(&self, c: &VolumeCheck) {
        if self.json {
            return self.print(json!({
                "SnapshotId": c.snapshot.as_str(),
                "Target": c.target.display().to_string(),
                "Matches": c.matches(),
                "BlocksChecked": c.blocks_checked,
                "DifferingBlocks": c.differing_blocks,
                "DifferingRanges": c.differing.iter().map(|r| json!({
                    "FirstBlock": r.first_block, "LastBlock": r.last_block, "Offset": r.offset, "Length": r.len,
                })).collect::<Vec<_>>(),
            }));
        }
        for r in &c.differing {
            println!(
                "differs: blocks {}-{} (bytes {}..{})",
                r.first_block,
                r.last_block,
                r.offset,
                r.offset + r.len
            );
        }
        if c.matches() {
            println!(
                "{} matches {} ({} blocks)",
                c.target.display(),
                c.snapshot,
                c.blocks_checked
            );
        } else {
            println!(
                "{} DIFFERS from {}: {} of {} blocks in {} ranges",
                c.target.display(),
                c.snapshot,
                c.differing_blocks,
                c.blocks_checked,
                c.differing.len()
            );
        }
    }

    pub fn verify(&self, r: &VerifyReport) {
        let bad = |b: &BadChunk| match &b.used_by {
            Some(u) => {
                json!({ "ChunkId": b.chunk.to_hex(), "SnapshotId": u.snapshot.as_str(), "Offset": u.offset, "Problem": b.problem })
            }
            None => json!({ "ChunkId": b.chunk.to_hex(), "Problem": b.problem }),
        };
        if self.json {
            return self.print(json!({
                "Clean": r.is_clean(),
                "SnapshotsChecked": r.snapshots_checked,
                "ImagesChecked": r.images_checked,
                "ChunksChecked": r.chunks_checked,
                "BytesChecked": r.bytes_checked,
                "DamagedManifests": r.damaged_manifests,
                "MissingChunks": r.missing_chunks.iter().map(bad).collect::<Vec<_>>(),
                "CorruptChunks": r.corrupt_chunks.iter().map(bad).collect::<Vec<_>>(),
                "NewerChunks": r.newer_chunks.iter().map(bad).collect::<Vec<_>>(),
                "OrphanChunks": r.orphan_chunks,
                "Quarantined": r.quarantined,
                "QuarantineHeld": r.quarantine_held,
                "SnapshotsUnauthenticated": r.snapshots_unauthenticated,
                "ChunksUnchecked": r.chunks_unchecked,
                "KeyProblems": r.key_problems,
            }));
        }
        if r.chunks_unchecked > 0 || r.snapshots_unauthenticated > 0 {
            println!(
                "{} encrypted chunks and {} encrypted block lists were checked for structure \
                 only, without their keys:",
                r.chunks_unchecked, r.snapshots_unauthenticated
            );
            for why in &r.key_problems {
                println!("  {why}");
            }
        }
        for m in &r.damaged_manifests {
            println!("damaged manifest: {m}");
        }
        for (what, list) in [
            ("missing", &r.missing_chunks),
            ("corrupt", &r.corrupt_chunks),
            ("unreadable", &r.newer_chunks),
        ] {
            for b in list {
                match &b.used_by {
                    Some(u) => println!(
                        "{what} chunk {} (needed by {} at offset {}): {}",
                        b.chunk, u.snapshot, u.offset, b.problem
                    ),
                    None => println!("{what} chunk {} (unused): {}", b.chunk, b.problem),
                }
            }
        }
        if r.quarantined > 0 {
            println!(
                "moved {} corrupt chunks aside (.bad); snapshot the same data again to store them anew",
                r.quarantined
            );
        }
        quarantine_hint("kept aside", r.quarantine_held);
        println!(
            "{}: {} snapshots, {} images, {} chunks ({}) checked; {} damaged manifests, {} missing, {} corrupt, {} from a newer blocksnap, {} orphan chunks",
            if r.is_clean() { "clean" } else { "DAMAGED" },
            r.snapshots_checked,
            r.images_checked,
            r.chunks_checked,
            human(r.bytes_checked),
            r.damaged_manifests.len(),
            r.missing_chunks.len(),
            r.corrupt_chunks.len(),
            r.newer_chunks.len(),
            r.orphan_chunks
        );
    }

    pub fn region_added(&self, name: &str, def: &RegionDef, region: &Region) {
        if self.json {
            return self.print(json!({
                "RegionName": name,
                "Location": def.url,
                "Endpoint": def.endpoint,
                "OwnerId": region.info().owner.as_str(),
            }));
        }
        println!(
            "region {name}: {} ({}), owner {}",
            def.url,
            def.endpoint.as_deref().unwrap_or("AWS S3"),
            region.info().owner
        );
    }

    pub fn local_region_added(&self, name: &str, region: &Region) {
        if self.json {
            return self.print(json!({
                "RegionName": name,
                "Location": region.location(),
                "OwnerId": region.info().owner.as_str(),
            }));
        }
        println!(
            "region {name}: {}, owner {}",
            region.location(),
            region.info().owner
        );
    }

    pub fn region_list(
        &self,
        root: &std::path::Path,
        local: &[String],
        defined: &std::collections::BTreeMap<String, RegionDef>,
    ) {
        let mut rows: Vec<(String, &str, String, Option<String>)> = local
            .iter()
            .map(|n| (n.clone(), "local", root.join(n).display().to_string(), None))
            .collect();
        rows.extend(
            defined
                .iter()
                .map(|(n, d)| (n.clone(), "s3", d.url.clone(), d.endpoint.clone())),
        );
        rows.sort();
        if self.json {
            let regions: Vec<Value> = rows
                .iter()
                .map(|(n, kind, loc, ep)| {
                    json!({"RegionName": n, "Backend": kind, "Location": loc, "Endpoint": ep})
                })
                .collect();
            return self.print(json!({ "Regions": regions }));
        }
        for (n, kind, loc, ep) in rows {
            match ep {
                Some(ep) => println!("{n:<20} {kind:<6} {loc} ({ep})"),
                None => println!("{n:<20} {kind:<6} {loc}"),
            }
        }
    }

    pub fn region_removed(&self, name: &str, def: &RegionDef) {
        if self.json {
            return self.print(json!({"RegionName": name, "Location": def.url}));
        }
        println!("region {name} forgotten; its data stays at {}", def.url);
    }

    pub fn gc(&self, r: &GcReport) {
        if self.json {
            return self.print(json!({
                "Snapshots": r.snapshots,
                "ChunksKept": r.chunks_kept,
                "ChunksRemoved": r.chunks_removed,
                "BytesRemoved": r.bytes_removed,
                "TempFilesRemoved": r.temp_files_removed,
                "QuarantinedKept": r.quarantined_kept,
                "QuarantinedRemoved": r.quarantined_removed,
                "RecycleBinKept": r.binned_kept,
                "RecycleBinPurged": r.binned_purged,
            }));
        }
        println!(
            "gc: {} snapshots, {} chunks kept, {} removed ({}), {} temporary files removed",
            r.snapshots,
            r.chunks_kept,
            r.chunks_removed,
            human(r.bytes_removed),
            r.temp_files_removed
        );
        if r.quarantined_removed > 0 {
            println!(
                "removed {} quarantined chunks (.bad)",
                r.quarantined_removed
            );
        }
        quarantine_hint("kept", r.quarantined_kept);
        if r.binned_kept + r.binned_purged > 0 {
            println!(
                "recycle bin: {} snapshots kept (their chunks too), {} objects purged past their retention",
                r.binned_kept, r.binned_purged
            );
        }
    }

    pub fn stats(&self, s: &RegionStats) {
        if self.json {
            return self.print(json!({
                "Region": s.region,
                "OwnerId": s.owner,
                "Root": s.root,
                "Snapshots": s.snapshots,
                "Chunks": s.chunks,
                "StoredBytes": s.stored_bytes,
                "QuarantinedChunks": s.quarantined,
                "QuarantinedBytes": s.quarantined_bytes,
            }));
        }
        println!("region {} at {} (owner {})", s.region, s.root, s.owner);
        println!(
            "{} snapshots, {} chunks, {} stored",
            s.snapshots,
            s.chunks,
            human(s.stored_bytes)
        );
        quarantine_hint(
            &format!("({}) kept aside", human(s.quarantined_bytes)),
            s.quarantined,
        );
    }
}

/// Prints a table: `columns` (name, width; a negative width aligns right),
/// then a last column as wide as it needs.
fn table(columns: &[(&str, i32)], last: &str, rows: impl Iterator<Item = (Vec<String>, String)>) {
    let render = |cells: &[String], last: &str| {
        let mut s = String::new();
        for (cell, (_, w)) in cells.iter().zip(columns) {
            let width = w.unsigned_abs() as usize;
            if *w < 0 {
                s.push_str(&format!("{cell:>width$} "));
            } else {
                s.push_str(&format!("{cell:<width$} "));
            }
        }
        s.push_str(last);
        s
    };
    let header: Vec<String> = columns.iter().map(|(n, _)| n.to_string()).collect();
    println!("{}", render(&header, last));
    for (cells, end) in rows {
        println!("{}", render(&cells, &end));
    }
}

/// Tells how many quarantined chunks remain and how to delete them.
fn quarantine_hint(state: &str, count: u64) {
    if count > 0 {
        println!(
            "{count} quarantined chunks (.bad) {state}: `blocksnap store gc --purge-quarantine` deletes them"
        );
    }
}

/// The progress bar, or nothing.
pub struct Bar(Option<ProgressBar>);

impl Bar {
    pub fn done(&self) {
        if let Some(pb) = &self.0 {
            pb.finish_and_clear();
        }
    }
}

impl Progress for Bar {
    fn start(&self, label: &str, total: u64) {
        if let Some(pb) = &self.0 {
            pb.set_message(label.to_string());
            pb.set_length(total);
            pb.set_position(0);
        }
    }

    fn advance(&self, bytes: u64) {
        if let Some(pb) = &self.0 {
            pb.inc(bytes);
        }
    }

    fn warn(&self, message: &str) {
        self.say("warning", message);
    }

    fn note(&self, message: &str) {
        self.say("note", message);
    }
}

impl Bar {
    /// One line on stderr, past the progress bar.
    fn say(&self, kind: &str, message: &str) {
        match &self.0 {
            Some(pb) => pb.suspend(|| eprintln!("blocksnap: {kind}: {message}")),
            None => eprintln!("blocksnap: {kind}: {message}"),
        }
    }
}

/// What stands for an encrypted snapshot's sealed meta read without its key.
const SEALED_NOTE: &str = "(encrypted: give the key's passphrase to see)";

fn shown_source(m: &SnapshotMeta) -> String {
    if m.sealed {
        SEALED_NOTE.into()
    } else {
        m.source.clone()
    }
}

fn snapshot_json(m: &SnapshotMeta) -> Value {
    let mut doc = json!({
        "SnapshotId": m.id.as_str(),
        "VolumeSize": blocksnap::format::image::gib_for(m.volume_size),
        "VolumeSizeBytes": m.volume_size,
        "BlockSize": m.block_size,
        "StartTime": humantime::format_rfc3339_millis(m.created()).to_string(),
        "State": "completed",
        "Progress": "100%",
        "OwnerId": m.owner.as_str(),
    });
    if m.sealed {
        // Only what anyone may see; `Sealed` says the rest exists.
        doc["Sealed"] = json!(true);
    } else {
        let s = &m.stats;
        doc["Description"] = json!(m.description);
        doc["Tags"] = json!(m.tags);
        doc["SourcePath"] = json!(m.source);
        doc["RootDigest"] = json!(hex(&m.root_digest));
        doc["Stats"] = json!({
            "DataBlocks": s.data_blocks,
            "ZeroBlocks": s.zero_blocks,
            "HoleBlocks": s.hole_blocks,
            "UnchangedBlocks": s.unchanged_blocks,
            "NewChunks": s.new_chunks,
            "NewBytesRaw": s.new_bytes_raw,
            "NewBytesStored": s.new_bytes_stored,
            "ReusedBytes": s.reused_bytes,
        });
    }
    if let Some(p) = &m.parent {
        doc["ParentSnapshotId"] = json!(p.as_str());
    }
    doc
}

fn checksum(b: &Block) -> Option<String> {
    b.chunk().map(|c| c.to_hex())
}

/// `1.50 GiB`-style sizes.
pub fn human(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = bytes as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{bytes} B")
    } else {
        format!("{v:.2} {}", UNITS[u])
    }
}

/// Prints the grants of an image's or a snapshot's permissions.
pub fn print_grants(
    out: &Out,
    id: &str,
    id_key: &str,
    doc: &impl serde::Serialize,
    grants: &[LaunchPermission],
) {
    if out.json {
        let mut doc = serde_json::to_value(doc).expect("permissions serialize");
        doc[id_key] = json!(id);
        out.print(doc);
        return;
    }
    if grants.is_empty() {
        println!("{id}: owner only");
    }
    for p in grants {
        match p {
            LaunchPermission::Account(a) => println!("{id}: account {a}"),
            LaunchPermission::Group(g) => println!("{id}: group {g} (public)"),
        }
    }
}

/// When a snapshot was taken, to the second, UTC.
fn start_time(m: &SnapshotMeta) -> String {
    humantime::format_rfc3339_seconds(m.created()).to_string()
}

/// A recycle bin entry in AWS's shape (ListSnapshotsInRecycleBin).
pub fn bin_entry_json(e: &blocksnap::format::lifecycle::BinEntry) -> Value {
    let id_key = match e.resource_type {
        blocksnap::format::lifecycle::ResourceType::EbsSnapshot => "SnapshotId",
        blocksnap::format::lifecycle::ResourceType::Ec2Image => "ImageId",
    };
    json!({
        id_key: e.id,
        "ResourceType": serde_json::to_value(e.resource_type).expect("serializes"),
        "RecycleBinEnterTime": e.recycle_bin_enter_time,
        "RecycleBinExitTime": e.recycle_bin_exit_time,
        "RuleIdentifier": e.rule.as_str(),
        "OwnerId": e.owner_id.as_str(),
    })
}
