//! Throughput of the hot paths, in bytes per second: hashing, zero
//! detection, chunk encode/decode, sealing and opening a chunk, a changed
//! block as a zstd delta vs a page delta, reading a volume with pread
//! vs a memory map, and a whole snapshot and restore of an in-page-cache
//! image.

use std::fs::File;
use std::hint::black_box;
use std::os::unix::fs::FileExt;
use std::time::Duration;

use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};

use blocksnap::format::chunk;
use blocksnap::ops::restore::{self, RestoreOptions};
use blocksnap::ops::snapshot::{self, CreateOptions, ParentChoice};
use blocksnap::progress::NoProgress;
use blocksnap::volume::io as volume;
use blocksnap::{ChunkId, Region};

const BLOCK: usize = 512 << 10;
const IMAGE: usize = 64 << 20;

fn text(len: usize) -> Vec<u8> {
    let mut v = Vec::with_capacity(len + 80);
    let mut i = 0u64;
    while v.len() < len {
        v.extend_from_slice(
            format!("host{} kernel: event {i} accepted connection\n", i % 7).as_bytes(),
        );
        i += 1;
    }
    v.truncate(len);
    v
}

fn random(len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    let mut x = 0x1234_5678_9abc_def1u64;
    for c in v.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        c.copy_from_slice(&x.to_le_bytes()[..c.len()]);
    }
    v
}

/// A 64 MiB image: a quarter text, a quarter random, a quarter zeros, a quarter hole.
fn image(dir: &std::path::Path) -> std::path::PathBuf {
    let path = dir.join("bench.img");
    let f = File::create(&path).unwrap();
    f.set_len(IMAGE as u64).unwrap();
    let q = IMAGE / 4;
    f.write_all_at(&text(q), 0).unwrap();
    f.write_all_at(&random(q), q as u64).unwrap();
    f.write_all_at(&vec![0u8; q], 2 * q as u64).unwrap();
    path
}

fn blocks(c: &mut Criterion) {
    let t = text(BLOCK);
    let r = random(BLOCK);
    let z = vec![0u8; BLOCK];
    let mut g = c.benchmark_group("block");
    g.throughput(Throughput::Bytes(BLOCK as u64));
    g.bench_function("blake3", |b| b.iter(|| ChunkId::of(black_box(&r))));
    g.bench_function("is_zero(zeros)", |b| {
        b.iter(|| volume::is_zero(black_box(&z)))
    });
    g.bench_function("encode(text)", |b| {
        b.iter(|| chunk::encode(black_box(&t)).unwrap())
    });
    g.bench_function("encode(random)", |b| {
        b.iter(|| chunk::encode(black_box(&r)).unwrap())
    });
    let (tid, tenc) = (ChunkId::of(&t), chunk::encode(&t).unwrap());
    let mut out = Vec::new();
    g.bench_function("decode+verify(text)", |b| {
        b.iter(|| {
            chunk::decode_into(
                &tid,
                black_box(&tenc),
                &mut out,
                &blocksnap::id::Namer::Plain,
            )
            .unwrap()
        })
    });
    let key = blocksnap::format::key::DataKey::new(
        blocksnap::id::KeyId([1; 16]),
        &blocksnap::format::key::Material::from_bytes([7; 32]),
    );
    let rid = ChunkId::of(&r);
    let renc = chunk::encode(&r).unwrap();
    g.bench_function("seal(random)", |b| {
        b.iter_batched(
            || renc.clone(),
            |plain| chunk::seal(&key, &rid, plain),
            BatchSize::LargeInput,
        )
    });
    let sealed = chunk::seal(&key, &rid, renc.clone());
    g.bench_function("unseal(random)", |b| {
        b.iter_batched(
            || sealed.clone(),
            |stored| chunk::unseal(&key, &rid, stored).unwrap(),
            BatchSize::LargeInput,
        )
    });
    g.finish();
}

fn reading(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("dense.img");
    std::fs::write(&path, random(IMAGE)).unwrap();
    let f = File::open(&path).unwrap();
    let mut g = c.benchmark_group("read+hash 64 MiB");
    g.throughput(Throughput::Bytes(IMAGE as u64));
    g.sample_size(20);
    let mut buf = vec![0u8; BLOCK];
    g.bench_function("pread", |b| {
        b.iter(|| {
            for off in (0..IMAGE).step_by(BLOCK) {
                f.read_exact_at(&mut buf, off as u64).unwrap();
                black_box(ChunkId::of(&buf));
            }
        })
    });
    // SAFETY (bench only): the file is private to this benchmark and not resized.
    let map = unsafe { memmap2::Mmap::map(&f).unwrap() };
    g.bench_function("mmap", |b| {
        b.iter(|| {
            for block in map.chunks(BLOCK) {
                black_box(ChunkId::of(block));
            }
        })
    });
    g.finish();
}

fn pipeline(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let img = image(dir.path());
    let mut g = c.benchmark_group("pipeline 64 MiB image");
    g.throughput(Throughput::Bytes(IMAGE as u64));
    g.sample_size(10);
    g.measurement_time(Duration::from_secs(8));
    let full = CreateOptions {
        parent: ParentChoice::None,
        ..Default::default()
    };
    g.bench_function("snapshot create (full)", |b| {
        b.iter_batched(
            || tempfile::tempdir().unwrap(),
            |store| {
                let region = Region::open_or_create(store.path(), "local").unwrap();
                snapshot::create(&region, &img, &full, &NoProgress).unwrap();
                store
            },
            BatchSize::PerIteration,
        )
    });
    let store = tempfile::tempdir().unwrap();
    let region = Region::open_or_create(store.path(), "local").unwrap();
    let first = snapshot::create(&region, &img, &full, &NoProgress).unwrap();
    g.bench_function("snapshot create (unchanged)", |b| {
        let opts = CreateOptions {
            parent: ParentChoice::Explicit(first.id.clone()),
            ..Default::default()
        };
        b.iter(|| snapshot::create(&region, &img, &opts, &NoProgress).unwrap())
    });
    let target = dir.path().join("restored.img");
    g.bench_function("restore (new file)", |b| {
        b.iter(|| {
            let _ = std::fs::remove_file(&target);
            restore::restore(
                &region,
                &first.id,
                &target,
                &RestoreOptions::default(),
                &NoProgress,
            )
            .unwrap()
        })
    });
    let delta = RestoreOptions {
        delta: true,
        ..Default::default()
    };
    g.bench_function("restore --delta (nothing differs)", |b| {
        b.iter(|| restore::restore(&region, &first.id, &target, &delta, &NoProgress).unwrap())
    });
    g.finish();
}

/// A changed block stored against its parent's: zstd's delta (the
/// parent's raw bytes as zstd's reference prefix, codec 2) beside the page
/// delta blocksnap writes (the changed pages and a bitmap, codec 3), for
/// three kinds of change. Both start from the parent's raw bytes, already
/// decoded. Prints the bytes each stores.
fn deltas(c: &mut Criterion) {
    const PAGE: usize = chunk::DELTA_PAGE;
    let base = text(BLOCK);
    let mut scattered = base.clone();
    scattered[40 * PAGE..41 * PAGE].copy_from_slice(&random(PAGE));
    let mut write64k = base.clone();
    write64k[64 * PAGE..80 * PAGE].copy_from_slice(&random(16 * PAGE));
    let mut edited = base.clone();
    for k in 0..8 {
        let at = 7_000 + k * 60_000;
        edited[at..at + 12].copy_from_slice(b"EDITED HERE!");
    }
    let id = ChunkId::of(&base);
    let mut g = c.benchmark_group("delta of a 512 KiB block");
    g.throughput(Throughput::Bytes(BLOCK as u64));
    for (name, raw) in [
        ("one 4 KiB page random", &scattered),
        ("a 64 KiB random write", &write64k),
        ("8 twelve-byte text edits", &edited),
    ] {
        let zd = chunk::encode_delta(raw, &id, &base, 0, BLOCK).map_or(0, |d| d.len());
        let pd = chunk::encode_page_delta(raw, &id, &base, 0, BLOCK).map_or(0, |d| d.len());
        eprintln!("{name}: zstd delta {zd} bytes, page delta {pd} bytes");
        g.bench_function(format!("zstd delta, {name}"), |b| {
            b.iter(|| chunk::encode_delta(black_box(raw), &id, &base, 0, BLOCK))
        });
        g.bench_function(format!("page delta, {name}"), |b| {
            b.iter(|| chunk::encode_page_delta(black_box(raw), &id, &base, 0, BLOCK))
        });
    }
    g.finish();
}

criterion_group!(benches, blocks, deltas, reading, pipeline);
criterion_main!(benches);
