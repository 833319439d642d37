//! The per-block work of the pipeline (zero check, blake3, zstd, and the receiver's verify)
//! and the frame decoder, on 512 KiB blocks of three kinds: zeros, text, random.
//!
//!   cargo bench -p lifeboat-benches --bench block_pipeline

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use lifeboat_common::block::{hash_block, is_zero};
use lifeboat_common::codec::{self, Codec};
use lifeboat_common::protocol::{decode_frame, encode_block};
use lifeboat_common::{BlockHash, BLOCK_SIZE};
use rand::RngCore;
use std::hint::black_box;

fn blocks() -> Vec<(&'static str, Vec<u8>)> {
    let zeros = vec![0u8; BLOCK_SIZE];
    let line = b"2026-11-22T08:00:00Z INFO request served path=/api/v1/items status=200 took=3ms\n";
    let text: Vec<u8> = line.iter().cycle().take(BLOCK_SIZE).copied().collect();
    let mut random = vec![0u8; BLOCK_SIZE];
    rand::thread_rng().fill_bytes(&mut random);
    vec![("zeros", zeros), ("text", text), ("random", random)]
}

fn per_block(c: &mut Criterion) {
    let mut g = c.benchmark_group("block");
    g.throughput(Throughput::Bytes(BLOCK_SIZE as u64));
    for (name, data) in blocks() {
        g.bench_with_input(BenchmarkId::new("zero_check", name), &data, |b, d| {
            b.iter(|| is_zero(black_box(d)))
        });
        g.bench_with_input(BenchmarkId::new("hash", name), &data, |b, d| {
            b.iter(|| hash_block(black_box(d)))
        });
        g.bench_with_input(BenchmarkId::new("agent_work", name), &data, |b, d| {
            // What a worker does for a changed block: name it, then compress it.
            b.iter(|| {
                let h = hash_block(black_box(d));
                if h.is_zero() {
                    return (h, None);
                }
                (
                    h,
                    Some(codec::encode(d, 1).map(|(_, v)| v.len()).unwrap_or(0)),
                )
            })
        });
        if name != "zeros" {
            let (c, enc) = codec::encode(&data, 1).unwrap_or((Codec::Raw, data.clone()));
            let h = hash_block(&data);
            g.bench_with_input(BenchmarkId::new("receiver_verify", name), &enc, |b, e| {
                b.iter(|| {
                    let plain = codec::decode(c, black_box(e)).unwrap_or_default();
                    hash_block(&plain) == h
                })
            });
        }
    }
    g.finish();
}

fn decoder(c: &mut Criterion) {
    let mut g = c.benchmark_group("decode_frame");
    let mut frame = Vec::new();
    let data = vec![7u8; 300_000];
    encode_block(
        &mut frame,
        1,
        0,
        42,
        &BlockHash([9; 32]),
        Codec::Zstd,
        &data,
    );
    g.throughput(Throughput::Bytes(frame.len() as u64));
    g.bench_function("block_300k", |b| {
        b.iter(|| decode_frame(black_box(&frame)).map(|o| o.map(|(_, n)| n)))
    });
    let mut acks = Vec::new();
    lifeboat_common::protocol::Message::Acks {
        seqs: (0..64).collect(),
    }
    .encode(&mut acks);
    g.throughput(Throughput::Bytes(acks.len() as u64));
    g.bench_function("acks_64", |b| {
        b.iter(|| decode_frame(black_box(&acks)).map(|o| o.map(|(_, n)| n)))
    });
    g.finish();
}

criterion_group!(benches, per_block, decoder);
criterion_main!(benches);
