//! Times the pieces of one encoder layer at MiniLM shape (4096 tokens, 384 hidden, 12 heads).
//!     cargo run --release -p berth-model --example profile_ops
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::time::Instant;

use berth_kernels::{activation, layer_norm, varlen_attention, Activation};
use candle_core::{Device, Tensor};

fn time(name: &str, flops: f64, mut f: impl FnMut()) {
    f();
    let n = 20;
    let t = Instant::now();
    for _ in 0..n {
        f();
    }
    let s = t.elapsed().as_secs_f64() / n as f64;
    println!(
        "{name:32} {:8.2} ms  {:6.1} GFLOP/s",
        s * 1e3,
        flops / s / 1e9
    );
}

fn main() -> candle_core::Result<()> {
    let (n, h, f) = (4096usize, 384usize, 1536usize);
    let d = Device::Cpu;
    let x = Tensor::randn(0f32, 1.0, (n, h), &d)?;
    let wqkv = Tensor::randn(0f32, 0.05, (3 * h, h), &d)?;
    let bqkv = Tensor::randn(0f32, 0.05, 3 * h, &d)?;
    let wi = Tensor::randn(0f32, 0.05, (f, h), &d)?;
    let wo = Tensor::randn(0f32, 0.05, (h, f), &d)?;
    let inter = Tensor::randn(0f32, 1.0, (n, f), &d)?;
    let g = Tensor::ones(h, candle_core::DType::F32, &d)?;
    let cu: Vec<usize> = (0..=32).map(|i| i * 128).collect();
    let qkv = x.matmul(&wqkv.t()?)?;
    let bi = Tensor::zeros(f, candle_core::DType::F32, &d)?;
    time(
        "linear op ffn up (bias fused)",
        2.0 * (n * h * f) as f64,
        || {
            berth_kernels::linear(&x, &wi, &bi).unwrap();
        },
    );
    time("qkv matmul (w.t())", 2.0 * (n * h * 3 * h) as f64, || {
        x.matmul(&wqkv.t().unwrap()).unwrap();
    });
    let wqkv_t = wqkv.t()?.contiguous()?;
    time(
        "qkv matmul (pre-transposed)",
        2.0 * (n * h * 3 * h) as f64,
        || {
            x.matmul(&wqkv_t).unwrap();
        },
    );
    time("qkv bias add", 0.0, || {
        qkv.broadcast_add(&bqkv).unwrap();
    });
    time("attention", 4.0 * (n * 128 * h) as f64, || {
        varlen_attention(&qkv, &cu, 12, 0.17).unwrap();
    });
    time("ffn up matmul", 2.0 * (n * h * f) as f64, || {
        x.matmul(&wi.t().unwrap()).unwrap();
    });
    time("gelu", 0.0, || {
        activation(&inter, Activation::Gelu).unwrap();
    });
    time("ffn down matmul", 2.0 * (n * h * f) as f64, || {
        inter.matmul(&wo.t().unwrap()).unwrap();
    });
    time("residual add", 0.0, || {
        (&x + &x).unwrap();
    });
    time("layer norm", 0.0, || {
        layer_norm(&x, &g, &g, 1e-12).unwrap();
    });
    {
        use berth_kernels::sgemm::{sgemm, Init, PackedB};
        let xs = x.flatten_all()?.to_vec1::<f32>()?;
        let is = inter.flatten_all()?.to_vec1::<f32>()?;
        let v = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let (pq, pi, po) = (
            PackedB::pack_transposed(&v(&wqkv), 3 * h, h),
            PackedB::pack_transposed(&v(&wi), f, h),
            PackedB::pack_transposed(&v(&wo), h, f),
        );
        let bias = vec![0.1f32; f];
        let mut out = vec![0f32; n * f];
        time("sgemm qkv", 2.0 * (n * h * 3 * h) as f64, || {
            sgemm(
                n,
                &xs,
                h,
                1,
                &pq,
                &mut out,
                3 * h,
                Init::Bias(&bias[..3 * h]),
            );
        });
        time("sgemm ffn up", 2.0 * (n * h * f) as f64, || {
            sgemm(n, &xs, h, 1, &pi, &mut out, f, Init::Bias(&bias));
        });
        time("sgemm ffn down", 2.0 * (n * h * f) as f64, || {
            sgemm(n, &is, f, 1, &po, &mut out, h, Init::Bias(&bias[..h]));
        });
        time("sgemm ffn up 16 rows", 2.0 * (16 * h * f) as f64, || {
            sgemm(16, &xs, h, 1, &pi, &mut out, f, Init::Bias(&bias));
        });
    }
    if berth_kernels::amx::available() {
        use berth_kernels::amx::{linear_bf16, PackedBf16};
        let xs = x.flatten_all()?.to_vec1::<f32>()?;
        let is = inter.flatten_all()?.to_vec1::<f32>()?;
        let pack = |w: &Tensor, o, i| {
            PackedBf16::pack(
                &w.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                &vec![0.0; o],
                o,
                i,
            )
        };
        let (pq, pi, po) = (pack(&wqkv, 3 * h, h), pack(&wi, f, h), pack(&wo, h, f));
        time("bf16 AMX qkv", 2.0 * (n * h * 3 * h) as f64, || {
            linear_bf16(&xs, n, &pq, None);
        });
        time("bf16 AMX ffn up", 2.0 * (n * h * f) as f64, || {
            linear_bf16(&xs, n, &pi, None);
        });
        time("bf16 AMX ffn down", 2.0 * (n * h * f) as f64, || {
            linear_bf16(&is, n, &po, None);
        });
        time("bf16 pack rows 4096x384", 0.0, || {
            berth_kernels::amx::pack_rows(&xs, n, h, h);
        });
        time("alloc 4096x1536 f32", 0.0, || {
            std::hint::black_box(vec![0f32; n * f]);
        });
        time(
            "bf16 AMX ffn up, 16 rows",
            2.0 * (16 * h * f) as f64,
            || {
                linear_bf16(&xs[..16 * h], 16, &pi, None);
            },
        );
        time(
            "f32 linear ffn up, 16 rows",
            2.0 * (16 * h * f) as f64,
            || {
                berth_kernels::linear(&x.narrow(0, 0, 16).unwrap(), &wi, &bi).unwrap();
            },
        );
    }
    Ok(())
}
