//! Test helpers: seeded random tensors, closeness with the max difference printed, and a
//! central finite-difference gradient check in f64.
use candle_core::{Device, Result, Tensor, Var};
use rand::{Rng, SeedableRng};

/// A seeded f64 tensor with entries uniform in [-1, 1).
pub fn randn(shape: &[usize], seed: u64) -> Result<Tensor> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let n: usize = shape.iter().product();
    let data: Vec<f64> = (0..n).map(|_| rng.random_range(-1.0..1.0)).collect();
    Tensor::from_vec(data, shape, &Device::Cpu)
}

/// Asserts `max |a - b| <= tol` and prints the difference.
pub fn assert_close(what: &str, a: &Tensor, b: &Tensor, tol: f64) -> Result<()> {
    assert_eq!(a.dims(), b.dims(), "{what}: shapes differ");
    let diff = (a.to_dtype(candle_core::DType::F64)? - b.to_dtype(candle_core::DType::F64)?)?
        .abs()?
        .flatten_all()?
        .max(0)?
        .to_scalar::<f64>()?;
    println!("{what}: max abs diff {diff:.3e}");
    assert!(diff <= tol, "{what}: max abs diff {diff:e} > {tol:e}");
    Ok(())
}

/// Checks the analytic gradient of `sum(f(inputs) * w)` (w random) against central
/// finite differences for every element of every input, and that every input gets a
/// non-zero gradient.
pub fn gradcheck(
    what: &str,
    inputs: &[Tensor],
    f: impl Fn(&[Tensor]) -> Result<Tensor>,
) -> Result<()> {
    let vars: Vec<Var> = inputs.iter().map(Var::from_tensor).collect::<Result<_>>()?;
    let as_tensors: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
    let out = f(&as_tensors)?;
    let w = randn(out.dims(), 99)?;
    let loss = |xs: &[Tensor]| -> Result<f64> { (f(xs)? * &w)?.sum_all()?.to_scalar::<f64>() };
    let grads = (out * &w)?.sum_all()?.backward()?;
    let h = 1e-6;
    let mut worst = 0f64;
    for (i, v) in vars.iter().enumerate() {
        let g = grads
            .get(v)
            .unwrap_or_else(|| panic!("{what}: input {i} received no gradient"))
            .flatten_all()?
            .to_vec1::<f64>()?;
        assert!(
            g.iter().any(|x| *x != 0.0),
            "{what}: input {i} has an all-zero gradient"
        );
        let base = inputs[i].flatten_all()?.to_vec1::<f64>()?;
        for j in 0..base.len() {
            let eval = |delta: f64| -> Result<f64> {
                let mut p = base.clone();
                p[j] += delta;
                let mut xs = inputs.to_vec();
                xs[i] = Tensor::from_vec(p, inputs[i].shape(), &Device::Cpu)?;
                loss(&xs)
            };
            let numeric = (eval(h)? - eval(-h)?) / (2.0 * h);
            let err = (numeric - g[j]).abs() / (1.0 + numeric.abs());
            worst = worst.max(err);
            assert!(
                err < 1e-6,
                "{what}: input {i}[{j}] analytic {} vs numeric {numeric}",
                g[j]
            );
        }
    }
    println!("{what}: finite-difference gradcheck worst relative error {worst:.3e}");
    Ok(())
}

/// A cheap seeded generator of f32 values uniform in [-0.5, 0.5) (kernel tests).
pub fn lcg(seed: &mut u64) -> f32 {
    *seed = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    ((*seed >> 40) as f32 / (1u64 << 24) as f32) - 0.5
}

/// fixtures/modernbert/kernels.json (scripts/make_modernbert_kernel_reference.py).
pub fn modernbert_kernels() -> serde_json::Value {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../fixtures/modernbert/kernels.json"
    );
    serde_json::from_str(&std::fs::read_to_string(path).expect("kernels.json")).expect("JSON")
}

/// A JSON list of equal-length rows as an f32 `[rows, cols]` tensor.
pub fn matrix(v: &serde_json::Value) -> Tensor {
    let rows: Vec<Vec<f32>> = serde_json::from_value(v.clone()).expect("rows of numbers");
    let (n, w) = (rows.len(), rows[0].len());
    Tensor::from_vec(rows.concat(), (n, w), &Device::Cpu).expect("rectangular")
}
