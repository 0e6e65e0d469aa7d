//! The scoring dot kernels: query columns against a batch of training columns (f32, or bf16
//! and f32 bytes as a store's mapping holds them), summed in f64 tile by tile, with AVX2 and
//! AVX-512 micro-kernels and a portable fallback.

use faer::Mat;

/// Columns of length `d`: the training side of a dot-product block.
#[derive(Clone, Copy)]
pub enum Columns<'a> {
    F32(&'a [&'a [f32]]),
    /// bfloat16 values (the upper half of an f32) as little-endian bytes at any alignment, as a
    /// store's mapping holds them; widened on the fly. Each column is `2·d` bytes.
    Bf16Le(&'a [&'a [u8]]),
    /// f32 values as little-endian bytes at any alignment; each column is `4·d` bytes.
    F32Le(&'a [&'a [u8]]),
}

impl<'a> Columns<'a> {
    fn len(&self) -> usize {
        match self {
            Columns::F32(b) => b.len(),
            Columns::Bf16Le(b) | Columns::F32Le(b) => b.len(),
        }
    }

    fn range(&self, from: usize, to: usize) -> Columns<'a> {
        match *self {
            Columns::F32(b) => Columns::F32(&b[from..to]),
            Columns::Bf16Le(b) => Columns::Bf16Le(&b[from..to]),
            Columns::F32Le(b) => Columns::F32Le(&b[from..to]),
        }
    }

    /// Element `i` of column `j`.
    fn at(&self, j: usize, i: usize) -> f32 {
        match self {
            Columns::F32(b) => b[j][i],
            Columns::Bf16Le(b) => {
                f32::from_bits((u16::from_le_bytes([b[j][2 * i], b[j][2 * i + 1]]) as u32) << 16)
            }
            Columns::F32Le(b) => {
                let c = &b[j][4 * i..4 * i + 4];
                f32::from_le_bytes([c[0], c[1], c[2], c[3]])
            }
        }
    }

    /// Whether every column holds `d` values.
    fn all_of_length(&self, d: usize) -> bool {
        match self {
            Columns::F32(b) => b.iter().all(|c| c.len() == d),
            Columns::Bf16Le(b) => b.iter().all(|c| c.len() == 2 * d),
            Columns::F32Le(b) => b.iter().all(|c| c.len() == 4 * d),
        }
    }
}

/// Elements of `d` per tile: a tile of 16 query columns (128 KiB) stays in L2 while every
/// training column of the batch streams past it.
const DOT_TILE: usize = 2048;

/// `out[s·nq + q] = Σ_i a_q[i] · b_s[i]` for the query columns `a` against the training columns
/// `b` (all of length `d`), accumulated in f64 tile by tile.
///
/// This is the product scoring spends its time in: few queries, a batch of training columns,
/// and a reduction over all of a layer's parameters. A general GEMM spends about as long packing
/// such skinny operands as multiplying them; here both sides are read in place (both are
/// contiguous along the reduction), bf16 is widened in registers, and the query tile is reused
/// from cache across the batch.
pub fn dots_into(out: &mut [f64], a: &[&[f32]], b: Columns<'_>, d: usize) {
    let (nq, ns) = (a.len(), b.len());
    assert!(
        a.iter().all(|c| c.len() == d),
        "query columns have length d"
    );
    assert!(b.all_of_length(d), "training columns have length d");
    assert_eq!(out.len(), ns * nq, "output is ns × nq");
    // Columns split over the threads, in whole micro-kernel blocks of 3.
    let threads = rayon::current_num_threads().max(1);
    let per = ns.div_ceil(threads).div_ceil(3) * 3;
    if threads > 1 && ns >= 6 && nq > 0 {
        use rayon::prelude::*;
        out.par_chunks_mut(per * nq)
            .enumerate()
            .for_each(|(i, chunk)| {
                let cols = chunk.len() / nq;
                dots_serial(chunk, a, b.range(i * per, i * per + cols), d);
            });
    } else {
        dots_serial(out, a, b, d);
    }
}

pub(super) fn dots_serial(out: &mut [f64], a: &[&[f32]], b: Columns<'_>, d: usize) {
    out.iter_mut().for_each(|x| *x = 0.0);
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            // SAFETY: the CPU supports the features the functions are compiled for (AVX-512
            // only when detected); every column has length d (asserted by the caller).
            unsafe { dots_avx2(out, a, b, d, std::arch::is_x86_feature_detected!("avx512f")) };
            return;
        }
    }
    dots_portable(out, a, b, d);
}

fn dots_portable(out: &mut [f64], a: &[&[f32]], b: Columns<'_>, d: usize) {
    let nq = a.len();
    for t0 in (0..d).step_by(DOT_TILE) {
        let t1 = (t0 + DOT_TILE).min(d);
        for s in 0..b.len() {
            for (q, aq) in a.iter().enumerate() {
                let aq = &aq[t0..t1];
                let sum: f32 = match b {
                    Columns::F32(b) => aq.iter().zip(&b[s][t0..t1]).map(|(x, y)| x * y).sum(),
                    _ => aq
                        .iter()
                        .enumerate()
                        .map(|(i, x)| x * b.at(s, t0 + i))
                        .sum(),
                };
                out[s * nq + q] += sum as f64;
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn dots_avx2(out: &mut [f64], a: &[&[f32]], b: Columns<'_>, d: usize, avx512: bool) {
    let (nq, ns) = (a.len(), b.len());
    for t0 in (0..d).step_by(DOT_TILE) {
        let len = DOT_TILE.min(d - t0);
        for s0 in (0..ns).step_by(3) {
            let sn = 3.min(ns - s0);
            // 8 query columns × 3 training columns per block with AVX-512 (24 of its 32
            // registers), 4 × 3 with AVX2 (12 of 16). Each dot is summed the same way in any
            // block, so the block size does not change the result.
            let qb = if avx512 { 8 } else { 4 };
            for q0 in (0..nq).step_by(qb) {
                let qn = qb.min(nq - q0);
                let mut sums = [[0f32; 3]; 8];
                macro_rules! block {
                    ($q:literal, $s:literal) => {
                        if avx512 {
                            micro_avx512::<$q, $s>(
                                &a[q0..q0 + $q],
                                b.range(s0, s0 + $s),
                                t0,
                                len,
                                &mut sums,
                            )
                        } else {
                            micro_avx2::<$q, $s>(
                                &a[q0..q0 + $q],
                                b.range(s0, s0 + $s),
                                t0,
                                len,
                                &mut sums,
                            )
                        }
                    };
                }
                macro_rules! columns {
                    ($q:literal) => {
                        match sn {
                            3 => block!($q, 3),
                            2 => block!($q, 2),
                            _ => block!($q, 1),
                        }
                    };
                }
                match qn {
                    8 => columns!(8),
                    7 => columns!(7),
                    6 => columns!(6),
                    5 => columns!(5),
                    4 => columns!(4),
                    3 => columns!(3),
                    2 => columns!(2),
                    _ => columns!(1),
                }
                for (i, row) in sums.iter().enumerate().take(qn) {
                    for (j, &v) in row.iter().enumerate().take(sn) {
                        out[(s0 + j) * nq + q0 + i] += v as f64;
                    }
                }
            }
        }
    }
}

/// `QN × SN` dot products over `len` elements from `t0`: QN·SN accumulators of 8 lanes.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn micro_avx2<const QN: usize, const SN: usize>(
    a: &[&[f32]],
    b: Columns<'_>,
    t0: usize,
    len: usize,
    sums: &mut [[f32; 3]; 8],
) {
    use std::arch::x86_64::*;
    let mut acc = [[_mm256_setzero_ps(); SN]; QN];
    let a_ptr: [*const f32; QN] = std::array::from_fn(|i| a[i].as_ptr().add(t0));
    let body = len / 8 * 8;
    let mut i = 0;
    while i < body {
        // Unaligned loads: the byte columns of a mapped store are at any alignment (and x86
        // is little-endian, as the store).
        // A loop, not `array::from_fn`: a closure is a function of its own, compiled without
        // this one's target features unless inlined, and one build did not inline it (the
        // loads then ran as calls, doubling the kernel's time).
        let mut bv = [_mm256_setzero_ps(); SN];
        for (j, v) in bv.iter_mut().enumerate() {
            *v = match b {
                Columns::F32(b) => _mm256_loadu_ps(b[j].as_ptr().add(t0 + i)),
                Columns::F32Le(b) => _mm256_loadu_ps(b[j].as_ptr().add(4 * (t0 + i)).cast()),
                Columns::Bf16Le(b) => {
                    let h = _mm_loadu_si128(b[j].as_ptr().add(2 * (t0 + i)).cast());
                    _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16))
                }
            };
        }
        for (q, row) in acc.iter_mut().enumerate() {
            let av = _mm256_loadu_ps(a_ptr[q].add(i));
            for (j, cell) in row.iter_mut().enumerate() {
                *cell = _mm256_fmadd_ps(av, bv[j], *cell);
            }
        }
        i += 8;
    }
    for (q, row) in acc.iter().enumerate() {
        for (j, cell) in row.iter().enumerate() {
            let mut lanes = [0f32; 8];
            _mm256_storeu_ps(lanes.as_mut_ptr(), *cell);
            sums[q][j] = lanes.iter().sum::<f32>() + dot_tail(a[q], b, j, t0, body, len);
        }
    }
}

/// [`micro_avx2`] 16 lanes wide.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn micro_avx512<const QN: usize, const SN: usize>(
    a: &[&[f32]],
    b: Columns<'_>,
    t0: usize,
    len: usize,
    sums: &mut [[f32; 3]; 8],
) {
    use std::arch::x86_64::*;
    let mut acc = [[_mm512_setzero_ps(); SN]; QN];
    let a_ptr: [*const f32; QN] = std::array::from_fn(|i| a[i].as_ptr().add(t0));
    let body = len / 16 * 16;
    let mut i = 0;
    while i < body {
        // A loop, not `array::from_fn`: see `micro_avx2`.
        let mut bv = [_mm512_setzero_ps(); SN];
        for (j, v) in bv.iter_mut().enumerate() {
            *v = match b {
                Columns::F32(b) => _mm512_loadu_ps(b[j].as_ptr().add(t0 + i)),
                Columns::F32Le(b) => _mm512_loadu_ps(b[j].as_ptr().add(4 * (t0 + i)).cast()),
                Columns::Bf16Le(b) => {
                    let h = _mm256_loadu_si256(b[j].as_ptr().add(2 * (t0 + i)).cast());
                    _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(h)))
                }
            };
        }
        for (q, row) in acc.iter_mut().enumerate() {
            let av = _mm512_loadu_ps(a_ptr[q].add(i));
            for (j, cell) in row.iter_mut().enumerate() {
                *cell = _mm512_fmadd_ps(av, bv[j], *cell);
            }
        }
        i += 16;
    }
    for (q, row) in acc.iter().enumerate() {
        for (j, cell) in row.iter().enumerate() {
            let mut lanes = [0f32; 16];
            _mm512_storeu_ps(lanes.as_mut_ptr(), *cell);
            sums[q][j] = lanes.iter().sum::<f32>() + dot_tail(a[q], b, j, t0, body, len);
        }
    }
}

/// The scalar remainder of a micro-kernel's dot product: elements `t0 + body .. t0 + len` of
/// query column `a` and training column `j` of `b`.
fn dot_tail(a: &[f32], b: Columns<'_>, j: usize, t0: usize, body: usize, len: usize) -> f32 {
    let mut sum = 0f32;
    for k in body..len {
        sum += a[t0 + k] * b.at(j, t0 + k);
    }
    sum
}

/// The columns of an owned matrix as contiguous slices.
pub fn columns(m: &Mat<f32>) -> Vec<&[f32]> {
    (0..m.ncols())
        .map(|k| {
            m.col(k)
                .try_as_col_major()
                .expect("an owned matrix's columns are contiguous")
                .as_slice()
        })
        .collect()
}

/// `Aᵀ B` for column-stacked `A` (`d × nq`, few columns) and `B` (`d × ns`), through
/// [`dots_into`]: `[nq × ns]`.
pub fn dots(a: &Mat<f32>, b: &Mat<f32>) -> Mat<f32> {
    let (ac, bc) = (columns(a), columns(b));
    let mut out = vec![0f64; a.ncols() * b.ncols()];
    dots_into(&mut out, &ac, Columns::F32(&bc), a.nrows());
    Mat::from_fn(a.ncols(), b.ncols(), |q, s| out[s * a.ncols() + q] as f32)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reference(a: &[Vec<f32>], b: &[Vec<f32>]) -> Vec<f64> {
        let mut out = vec![0.0; a.len() * b.len()];
        for (s, bs) in b.iter().enumerate() {
            for (q, aq) in a.iter().enumerate() {
                out[s * a.len() + q] = aq.iter().zip(bs).map(|(x, y)| *x as f64 * *y as f64).sum();
            }
        }
        out
    }

    #[test]
    fn dot_blocks_equal_an_f64_reference_for_every_edge_shape() {
        // Lengths around the 8-lane body and the tile, block counts that leave edges, and
        // enough columns to split over threads.
        for (nq, ns, d) in [
            (16, 32, 5000),
            (5, 7, 13),
            (1, 1, 1),
            (4, 3, 2048),
            (3, 5, 2049),
            (17, 4, 4103),
        ] {
            let a: Vec<Vec<f32>> = (0..nq)
                .map(|q| {
                    (0..d)
                        .map(|i| (((q * d + i) * 37 % 101) as f32 - 50.0) / 17.0)
                        .collect()
                })
                .collect();
            let b: Vec<Vec<f32>> = (0..ns)
                .map(|s| {
                    (0..d)
                        .map(|i| (((s * d + i) * 53 % 97) as f32 - 48.0) / 13.0)
                        .collect()
                })
                .collect();
            let ar: Vec<&[f32]> = a.iter().map(|c| c.as_slice()).collect();
            let br: Vec<&[f32]> = b.iter().map(|c| c.as_slice()).collect();
            let want = reference(&a, &b);
            let scale = want.iter().fold(1f64, |m, x| m.max(x.abs()));
            let close = |got: &[f64], want: &[f64], what: &str| {
                for (g, w) in got.iter().zip(want) {
                    assert!(
                        (g - w).abs() < 1e-5 * scale,
                        "{what} {nq}×{ns}×{d}: {g} vs {w}"
                    );
                }
            };
            let mut got = vec![0.0; ns * nq];
            dots_into(&mut got, &ar, Columns::F32(&br), d);
            close(&got, &want, "f32");
            let mut portable = vec![0.0; ns * nq];
            dots_portable(&mut portable, &ar, Columns::F32(&br), d);
            close(&portable, &want, "portable");
            // bf16: the reference uses the same rounded training values.
            let bits: Vec<Vec<u16>> = b
                .iter()
                .map(|c| c.iter().map(|x| (x.to_bits() >> 16) as u16).collect())
                .collect();
            let widened: Vec<Vec<f32>> = bits
                .iter()
                .map(|c| {
                    c.iter()
                        .map(|&h| f32::from_bits((h as u32) << 16))
                        .collect()
                })
                .collect();
            // As a store's mapping holds them: little-endian bytes, one byte past an aligned
            // start (a record's tag byte), so that no value is aligned to its width.
            let misaligned = |bytes: Vec<u8>| -> Vec<u8> {
                let mut v = vec![0xAB];
                v.extend(bytes);
                v
            };
            let bf16_bytes: Vec<Vec<u8>> = bits
                .iter()
                .map(|c| misaligned(c.iter().flat_map(|h| h.to_le_bytes()).collect()))
                .collect();
            let bf16_cols: Vec<&[u8]> = bf16_bytes.iter().map(|c| &c[1..]).collect();
            let widened_want = reference(&a, &widened);
            dots_into(&mut got, &ar, Columns::Bf16Le(&bf16_cols), d);
            close(&got, &widened_want, "bf16");
            portable.fill(0.0); // the portable kernel accumulates
            dots_portable(&mut portable, &ar, Columns::Bf16Le(&bf16_cols), d);
            close(&portable, &widened_want, "bf16 portable");
            let f32_bytes: Vec<Vec<u8>> = b
                .iter()
                .map(|c| misaligned(c.iter().flat_map(|x| x.to_le_bytes()).collect()))
                .collect();
            let f32_cols: Vec<&[u8]> = f32_bytes.iter().map(|c| &c[1..]).collect();
            let mut from_bytes = vec![0.0; ns * nq];
            dots_into(&mut from_bytes, &ar, Columns::F32Le(&f32_cols), d);
            dots_into(&mut got, &ar, Columns::F32(&br), d);
            assert_eq!(from_bytes, got, "f32 bytes sum exactly as f32 slices");
            portable.fill(0.0);
            dots_portable(&mut portable, &ar, Columns::F32Le(&f32_cols), d);
            close(&portable, &want, "f32 bytes portable");
            // Through owned matrices (padded column strides).
            let am = Mat::from_fn(d, nq, |i, q| a[q][i]);
            let bm = Mat::from_fn(d, ns, |i, s| b[s][i]);
            let m = dots(&am, &bm);
            for s in 0..ns {
                for q in 0..nq {
                    assert!((m[(q, s)] as f64 - want[s * nq + q]).abs() < 1e-5 * scale);
                }
            }
        }
    }
}
