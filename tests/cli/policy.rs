//! The rules hold for a program that uses the library, not only for the
//! command line: who may restore, verify against or build on a snapshot,
//! and that a snapshot backing an image cannot be deleted.

use std::fs;

use blocksnap::error::Error;
use blocksnap::image::create::{ImageCreateOptions, MapSource, MapSpec, create_from_volumes};
use blocksnap::ops::access;
use blocksnap::ops::restore::{self, RestoreOptions};
use blocksnap::ops::snapshot::{self, CreateOptions, ParentChoice};
use blocksnap::ops::verify::verify_volume;
use blocksnap::progress::NoProgress;
use blocksnap::region::permissions::{Grantee, PermissionChange};
use blocksnap::{AccountId, Region};

#[test]
fn a_library_caller_meets_the_same_permission_and_in_use_rules() {
    let dir = tempfile::tempdir().unwrap();
    let region = Region::open_or_create(&dir.path().join("store"), "local").unwrap();
    let owner = region.info().owner.clone();
    let other: AccountId = "222222222222".parse().unwrap();
    let vol = dir.path().join("disk.img");
    fs::write(&vol, vec![7u8; 1 << 20]).unwrap();
    let snap = snapshot::create(&region, &vol, &CreateOptions::default(), &NoProgress).unwrap();
    let target = dir.path().join("restored.img");
    let as_other = RestoreOptions {
        caller: Some(other.clone()),
        ..RestoreOptions::default()
    };

    // Private: another account may not restore, verify against or build on it.
    let e = restore::restore(&region, &snap.id, &target, &as_other, &NoProgress).unwrap_err();
    assert!(matches!(e, Error::SnapshotNotPermitted { .. }), "{e}");
    assert!(!target.exists());
    let e = verify_volume(&region, &snap.id, &vol, &other, 1, &NoProgress).unwrap_err();
    assert!(matches!(e, Error::SnapshotNotPermitted { .. }), "{e}");
    let child = CreateOptions {
        parent: ParentChoice::Explicit(snap.id.clone()),
        owner: Some(other.clone()),
        ..CreateOptions::default()
    };
    let e = snapshot::create(&region, &vol, &child, &NoProgress).unwrap_err();
    assert!(matches!(e, Error::SnapshotNotPermitted { .. }), "{e}");
    assert_eq!(region.snapshot_ids().unwrap(), vec![snap.id.clone()]);

    // Shared with it: all three work.
    let share = PermissionChange {
        add: vec![Grantee::Account(other.clone())],
        ..PermissionChange::default()
    };
    access::modify(&region, &snap.id, &owner, &share).unwrap();
    restore::restore(&region, &snap.id, &target, &as_other, &NoProgress).unwrap();
    assert_eq!(fs::read(&target).unwrap(), fs::read(&vol).unwrap());
    assert!(
        verify_volume(&region, &snap.id, &vol, &other, 1, &NoProgress)
            .unwrap()
            .matches()
    );
    snapshot::create(&region, &vol, &child, &NoProgress).unwrap();

    // A snapshot an image uses cannot be deleted, by its owner either.
    let maps = [MapSpec {
        device: "/dev/xvda".parse().unwrap(),
        source: MapSource::Volume(vol.clone()),
    }];
    let opts = ImageCreateOptions::new("golden", owner.clone());
    let made = create_from_volumes(&region, &maps, &opts, &NoProgress).unwrap();
    let backing = &made.snapshots[0].snapshot.id;
    let e = access::delete(&region, backing, &owner).unwrap_err();
    assert!(matches!(e, Error::SnapshotInUse { .. }), "{e}");
    assert!(region.has_snapshot(backing).unwrap());
}
