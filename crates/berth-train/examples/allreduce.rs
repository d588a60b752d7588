//! What berth's gradient all-reduce costs per step at bert-base's size, against the bucket
//! size, and what that projects to on more ranks over a real network. Run under MPI:
//!
//!     cargo build --release -p berth-train --features mpi --example allreduce
//!     mpirun -np 2 target/release/examples/allreduce [ELEMENTS] [REPEATS]
//!
//! ELEMENTS defaults to 109,482,240 (bert-base-uncased's parameters, 438 MB of f32
//! gradients). Every rank sums a buffer of that size with each bucket size, both ways berth
//! can (the ring it trains with, and the all-gather + rank-ordered add it used before; the
//! best of REPEATS, default 3, between barriers, and the sums checked); rank 0 prints the
//! times and bytes received per rank, the per-bucket overhead and the summation time, and
//! the wire time of a step at 25 Gb/s on 8 and 64 ranks for both forms.
use std::time::Instant;

use berth_train::dist::mpi_world::MpiWorld;
use berth_train::dist::Collective;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let elements: usize = args.get(1).map_or(Ok(109_482_240), |s| s.parse())?;
    let repeats: usize = args.get(2).map_or(Ok(3), |s| s.parse())?;
    let world = MpiWorld::init()?;
    let (rank, n) = (world.rank(), world.world_size());
    let bytes = elements as f64 * 4.0;
    let mut buf = vec![0f32; elements];
    if rank == 0 {
        println!(
            "{n} ranks, {elements} f32 ({:.0} MB) per all-reduce, best of {repeats}",
            bytes / 1e6
        );
        println!("bucket (elements)  buckets  seconds  MB received per rank  MB/s received  ring: seconds  MB received");
    }
    let buckets = [1usize << 16, 1 << 18, 1 << 20, 1 << 22, 1 << 24];
    let mut times = Vec::new();
    for &bucket in &buckets {
        let mut best = f64::MAX;
        let mut ring = f64::MAX;
        for _ in 0..repeats {
            for use_ring in [false, true] {
                buf.iter_mut()
                    .enumerate()
                    .for_each(|(i, x)| *x = (i % 7) as f32 + rank as f32);
                world.barrier();
                let t = Instant::now();
                if use_ring {
                    world.ring_all_reduce_sum_in(&mut buf, bucket)?;
                } else {
                    world.all_reduce_sum_in(&mut buf, bucket)?;
                }
                world.barrier();
                let s = t.elapsed().as_secs_f64();
                if use_ring {
                    ring = ring.min(s);
                } else {
                    best = best.min(s);
                }
            }
        }
        // Every rank holds the sum of the ranks' values.
        let want = |i: usize| (n * (i % 7) + n * (n - 1) / 2) as f32;
        assert!(buf
            .iter()
            .enumerate()
            .step_by(9973)
            .all(|(i, &x)| x == want(i)));
        times.push(best);
        let received = bytes * (n - 1) as f64;
        if rank == 0 {
            println!(
                "{bucket:>17}  {:>7}  {best:>7.3}  {:>20.0}  {:>13.0}  {ring:>13.3}  {:>11.0}",
                elements.div_ceil(bucket),
                received / 1e6,
                received / 1e6 / best,
                bytes * 2.0 * (n - 1) as f64 / n as f64 / 1e6
            );
        }
    }
    // The summation alone (what every rank adds after the gathers), timed here.
    let copies = vec![1f32; elements * n];
    let t = Instant::now();
    let mut acc = 0f32;
    for chunk in copies.chunks(elements) {
        for (a, b) in buf.iter_mut().zip(chunk) {
            *a += b;
        }
        acc += buf[elements / 2];
    }
    let sum_s = t.elapsed().as_secs_f64();
    std::hint::black_box(acc);
    if rank == 0 {
        // The overhead of one more bucket: the smallest buckets' extra time over the
        // fastest size, per extra bucket.
        let (best, tb) = buckets
            .iter()
            .zip(&times)
            .min_by(|a, b| a.1.total_cmp(b.1))
            .map(|(b, t)| (*b, *t))
            .expect("bucket sizes");
        let extra = elements.div_ceil(buckets[0]) as f64 - elements.div_ceil(best) as f64;
        let per_bucket = if extra > 0.0 {
            ((times[0] - tb) / extra).max(0.0)
        } else {
            0.0
        };
        println!(
            "per-bucket overhead ~{:.3} ms; summing {n} copies {sum_s:.3} s; fastest bucket here {best}",
            per_bucket * 1e3
        );
        let link = 25e9 / 8.0; // bytes per second on a 25 Gb/s link
        let buckets_per_step = elements.div_ceil(berth_train::dist::mpi_world::BUCKET);
        for ranks in [8usize, 64] {
            let ring = bytes * 2.0 * (ranks - 1) as f64 / ranks as f64 / link;
            let gather = bytes * (ranks - 1) as f64 / link;
            let adds = sum_s * ranks as f64 / n as f64;
            println!(
                "{ranks} ranks at 25 Gb/s: ring (berth's sum) {ring:.2} s on the wire + {} message latencies; the all-gather form {gather:.2} s on the wire + {adds:.2} s summing",
                2 * (ranks - 1) * buckets_per_step
            );
        }
    }
    Ok(())
}
