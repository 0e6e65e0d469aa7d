//! The GGUF container: a memory-mapped file's header (metadata, tensor table) and its tensors
//! dequantised to f32 (F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q4_K, Q6_K checked against gguf-py in
//! the tests, and the other types candle's ggml kernels read: Q5_0, Q5_1, Q2_K, Q3_K, Q5_K).

use crate::error::{Error, Result};
use candle_core::quantized::GgmlDType;
use candle_core::{Device, Tensor};
use std::collections::HashMap;
use std::path::Path;

/// A metadata value.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Int(i128),
    Float(f64),
    Bool(bool),
    Str(String),
    Array(Vec<Value>),
}

impl Value {
    pub(crate) fn as_usize(&self) -> Option<usize> {
        match self {
            Value::Int(i) => usize::try_from(*i).ok(),
            _ => None,
        }
    }

    pub(crate) fn as_f64(&self) -> Option<f64> {
        match self {
            Value::Float(f) => Some(*f),
            Value::Int(i) => Some(*i as f64),
            _ => None,
        }
    }

    pub(crate) fn as_str(&self) -> Option<&str> {
        match self {
            Value::Str(s) => Some(s),
            _ => None,
        }
    }
}

/// One tensor's header entry.
#[derive(Debug, Clone)]
pub struct TensorInfo {
    /// Row-major shape (GGUF lists dimensions fastest-first; this is reversed).
    pub shape: Vec<usize>,
    pub ggml_type: u32,
    /// Byte offset from the start of the tensor data section.
    pub offset: u64,
}

/// A parsed, memory-mapped GGUF file.
pub struct GgufFile {
    pub(crate) path: String,
    map: memmap2::Mmap,
    pub metadata: HashMap<String, Value>,
    pub tensors: HashMap<String, TensorInfo>,
    /// Tensor names in file order.
    pub order: Vec<String>,
    data_offset: usize,
}

/// ggml type ids → (name, elements per block, bytes per block).
pub fn ggml_type_info(t: u32) -> Option<(&'static str, usize, usize)> {
    Some(match t {
        0 => ("F32", 1, 4),
        1 => ("F16", 1, 2),
        2 => ("Q4_0", 32, 18),
        3 => ("Q4_1", 32, 20),
        6 => ("Q5_0", 32, 22),
        7 => ("Q5_1", 32, 24),
        8 => ("Q8_0", 32, 34),
        9 => ("Q8_1", 32, 36),
        10 => ("Q2_K", 256, 84),
        11 => ("Q3_K", 256, 110),
        12 => ("Q4_K", 256, 144),
        13 => ("Q5_K", 256, 176),
        14 => ("Q6_K", 256, 210),
        15 => ("Q8_K", 256, 292),
        16 => ("IQ2_XXS", 256, 66),
        17 => ("IQ2_XS", 256, 74),
        18 => ("IQ3_XXS", 256, 98),
        19 => ("IQ1_S", 256, 50),
        20 => ("IQ4_NL", 32, 18),
        21 => ("IQ3_S", 256, 110),
        22 => ("IQ2_S", 256, 82),
        23 => ("IQ4_XS", 256, 136),
        24 => ("I8", 1, 1),
        25 => ("I16", 1, 2),
        26 => ("I32", 1, 4),
        27 => ("I64", 1, 8),
        28 => ("F64", 1, 8),
        29 => ("IQ1_M", 256, 56),
        30 => ("BF16", 1, 2),
        34 => ("TQ1_0", 256, 54),
        35 => ("TQ2_0", 256, 66),
        _ => return None,
    })
}

/// The types this reader dequantises.
fn candle_dtype(t: u32) -> Option<GgmlDType> {
    Some(match t {
        0 => GgmlDType::F32,
        1 => GgmlDType::F16,
        2 => GgmlDType::Q4_0,
        3 => GgmlDType::Q4_1,
        6 => GgmlDType::Q5_0,
        7 => GgmlDType::Q5_1,
        8 => GgmlDType::Q8_0,
        10 => GgmlDType::Q2K,
        11 => GgmlDType::Q3K,
        12 => GgmlDType::Q4K,
        13 => GgmlDType::Q5K,
        14 => GgmlDType::Q6K,
        30 => GgmlDType::BF16,
        _ => return None,
    })
}

/// A little-endian cursor over the header bytes with bounds checks.
struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
    path: &'a str,
}

impl Reader<'_> {
    fn take(&mut self, n: usize) -> Result<&[u8]> {
        let end = self.pos.checked_add(n).filter(|e| *e <= self.bytes.len());
        match end {
            Some(end) => {
                let s = &self.bytes[self.pos..end];
                self.pos = end;
                Ok(s)
            }
            None => Err(Error::input(format!(
                "{}: truncated GGUF header (needs {n} bytes at offset {})",
                self.path, self.pos
            ))),
        }
    }

    fn u32(&mut self) -> Result<u32> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn u64(&mut self) -> Result<u64> {
        let b = self.take(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_le_bytes(a))
    }

    fn len(&mut self) -> Result<usize> {
        let n = self.u64()?;
        usize::try_from(n)
            .ok()
            .filter(|n| *n <= self.bytes.len())
            .ok_or_else(|| Error::input(format!("{}: corrupt GGUF header (length {n})", self.path)))
    }

    fn string(&mut self) -> Result<String> {
        let n = self.len()?;
        let b = self.take(n)?;
        Ok(String::from_utf8_lossy(b).into_owned())
    }

    fn value(&mut self, ty: u32, depth: usize) -> Result<Value> {
        Ok(match ty {
            0 => Value::Int(self.take(1)?[0] as i128),
            1 => Value::Int(self.take(1)?[0] as i8 as i128),
            2 => {
                let b = self.take(2)?;
                Value::Int(u16::from_le_bytes([b[0], b[1]]) as i128)
            }
            3 => {
                let b = self.take(2)?;
                Value::Int(i16::from_le_bytes([b[0], b[1]]) as i128)
            }
            4 => Value::Int(self.u32()? as i128),
            5 => Value::Int(self.u32()? as i32 as i128),
            6 => Value::Float(f32::from_bits(self.u32()?) as f64),
            7 => Value::Bool(self.take(1)?[0] != 0),
            8 => Value::Str(self.string()?),
            9 => {
                if depth > 2 {
                    return Err(Error::input(format!(
                        "{}: GGUF metadata arrays nested too deeply",
                        self.path
                    )));
                }
                let elem = self.u32()?;
                let n = self.len()?;
                let mut v = Vec::with_capacity(n.min(1 << 20));
                for _ in 0..n {
                    v.push(self.value(elem, depth + 1)?);
                }
                Value::Array(v)
            }
            10 => Value::Int(self.u64()? as i128),
            11 => Value::Int(self.u64()? as i64 as i128),
            12 => Value::Float(f64::from_bits(self.u64()?)),
            other => {
                return Err(Error::input(format!(
                    "{}: unknown GGUF metadata value type {other}",
                    self.path
                )))
            }
        })
    }
}

impl GgufFile {
    /// Memory-maps `path` and parses its header.
    pub fn open(path: &Path) -> Result<Self> {
        let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
        // SAFETY: mapped read-only; like every mmap user we rely on nobody truncating the file
        // while it is read.
        let map = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
        let name = path.display().to_string();
        let mut r = Reader {
            bytes: &map,
            pos: 0,
            path: &name,
        };
        if r.take(4)? != b"GGUF" {
            return Err(Error::input(format!("{name}: not a GGUF file (bad magic)")));
        }
        let version = r.u32()?;
        if !(2..=3).contains(&version) {
            return Err(Error::input(format!(
                "{name}: GGUF version {version} is not supported (2 and 3 are)"
            )));
        }
        let n_tensors = r.len()?;
        let n_kv = r.len()?;
        let mut metadata = HashMap::new();
        for _ in 0..n_kv {
            let key = r.string()?;
            let ty = r.u32()?;
            let v = r.value(ty, 0)?;
            metadata.insert(key, v);
        }
        let mut tensors = HashMap::new();
        // The count is the file's word: reserve no more than a plausible header holds.
        let mut order = Vec::with_capacity(n_tensors.min(1 << 16));
        for _ in 0..n_tensors {
            let tname = r.string()?;
            let n_dims = r.u32()?;
            if n_dims > 4 {
                return Err(Error::input(format!(
                    "{name}: tensor `{tname}` has {n_dims} dimensions"
                )));
            }
            let mut shape = Vec::with_capacity(n_dims as usize);
            for _ in 0..n_dims {
                shape.push(r.len()?);
            }
            shape.reverse();
            let ggml_type = r.u32()?;
            let offset = r.u64()?;
            order.push(tname.clone());
            tensors.insert(
                tname,
                TensorInfo {
                    shape,
                    ggml_type,
                    offset,
                },
            );
        }
        let alignment = metadata
            .get("general.alignment")
            .and_then(Value::as_usize)
            .filter(|a| *a > 0)
            .unwrap_or(32);
        let data_offset = r.pos.div_ceil(alignment) * alignment;
        Ok(GgufFile {
            path: name,
            map,
            metadata,
            tensors,
            order,
            data_offset,
        })
    }

    pub(crate) fn meta(&self, key: &str) -> Result<&Value> {
        self.metadata
            .get(key)
            .ok_or_else(|| Error::input(format!("{}: metadata key `{key}` is missing", self.path)))
    }

    pub(crate) fn meta_usize(&self, key: &str) -> Result<usize> {
        self.meta(key)?.as_usize().ok_or_else(|| {
            Error::input(format!(
                "{}: metadata `{key}` must be an integer",
                self.path
            ))
        })
    }

    pub(crate) fn meta_f64_or(&self, key: &str, default: f64) -> Result<f64> {
        match self.metadata.get(key) {
            None => Ok(default),
            Some(v) => v.as_f64().ok_or_else(|| {
                Error::input(format!("{}: metadata `{key}` must be a number", self.path))
            }),
        }
    }

    pub(crate) fn meta_str(&self, key: &str) -> Result<&str> {
        self.meta(key)?.as_str().ok_or_else(|| {
            Error::input(format!("{}: metadata `{key}` must be a string", self.path))
        })
    }

    /// Tensor `name` dequantised to f32, row-major shape.
    pub fn tensor(&self, name: &str) -> Result<Tensor> {
        let info = self
            .tensors
            .get(name)
            .ok_or_else(|| Error::input(format!("{}: tensor `{name}` is missing", self.path)))?;
        let (tname, block, bytes) = ggml_type_info(info.ggml_type).unwrap_or(("unknown", 1, 0));
        let dtype = candle_dtype(info.ggml_type).ok_or_else(|| {
            Error::input(format!(
                "{}: tensor `{name}` has GGML type {tname} (id {}), which is not supported (supported: F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K)",
                self.path, info.ggml_type
            ))
        })?;
        let too_large = || {
            Error::input(format!(
                "{}: tensor `{name}` has shape {:?}, too large to address (corrupt header?)",
                self.path, info.shape
            ))
        };
        let n = info
            .shape
            .iter()
            .try_fold(1usize, |n, &d| n.checked_mul(d))
            .ok_or_else(too_large)?;
        let row = info.shape.last().copied().unwrap_or(1);
        if block == 0 || row % block != 0 {
            return Err(Error::input(format!(
                "{}: tensor `{name}` rows of {row} are not a multiple of the {tname} block size {block}",
                self.path
            )));
        }
        let size = (n / block).checked_mul(bytes).ok_or_else(too_large)?;
        let start = usize::try_from(info.offset)
            .ok()
            .and_then(|o| o.checked_add(self.data_offset));
        let range = start
            .and_then(|s| Some(s..s.checked_add(size)?))
            .filter(|r| r.end <= self.map.len())
            .ok_or_else(|| {
                Error::input(format!(
                    "{}: tensor `{name}` extends past the end of the file (truncated download?)",
                    self.path
                ))
            })?;
        let q = candle_core::quantized::ggml_file::qtensor_from_ggml(
            dtype,
            &self.map[range],
            info.shape.clone(),
            &Device::Cpu,
        )?;
        Ok(q.dequantize(&Device::Cpu)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::autograd::testing::fixture;

    #[test]
    fn dequantisation_matches_gguf_py() {
        let f = GgufFile::open(&fixture("quant.gguf")).unwrap();
        let reference =
            candle_core::safetensors::load(fixture("quant_reference.safetensors"), &Device::Cpu)
                .unwrap();
        let mut seen = Vec::new();
        for name in &f.order {
            let got = f.tensor(name).unwrap();
            let want = &reference[name];
            assert_eq!(got.dims(), want.dims(), "{name}");
            let (g, w) = (
                got.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                want.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            );
            let worst = g
                .iter()
                .zip(&w)
                .map(|(a, b)| (a - b).abs() / (1.0 + b.abs()))
                .fold(0f32, f32::max);
            eprintln!("{name}: max rel diff vs gguf-py {worst:e}");
            assert!(worst < 1e-6, "{name}: {worst}");
            assert!(w.iter().any(|x| *x != 0.0));
            seen.push(name.as_str());
        }
        for t in ["f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "q4_k", "q6_k"] {
            assert!(seen.contains(&format!("t_{t}").as_str()), "{t} not tested");
        }
    }

    /// A header whose four dimensions multiply past `usize`: an error, not an overflow.
    #[test]
    fn a_shape_too_large_to_address_is_an_error() {
        let mut b = b"GGUF".to_vec();
        b.extend(3u32.to_le_bytes());
        b.extend(1u64.to_le_bytes()); // tensors
        b.extend(0u64.to_le_bytes()); // metadata keys
        b.extend(1u64.to_le_bytes());
        b.push(b't');
        b.extend(4u32.to_le_bytes());
        for _ in 0..4 {
            b.extend(70_000u64.to_le_bytes());
        }
        b.extend(0u32.to_le_bytes()); // F32
        b.extend(0u64.to_le_bytes());
        b.resize(70_016, 0); // long enough for each dimension to pass the header's length check
        let p = std::env::temp_dir().join(format!("infl-gguf-huge-{}.gguf", std::process::id()));
        std::fs::write(&p, &b).unwrap();
        let err = GgufFile::open(&p).unwrap().tensor("t").unwrap_err();
        assert!(err.to_string().contains("too large to address"), "{err}");
        std::fs::remove_file(&p).unwrap();
    }

    #[test]
    fn unsupported_type_and_bad_files_are_clear_errors() {
        let dir = std::env::temp_dir().join(format!("infl-gguf-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let bytes = std::fs::read(fixture("quant.gguf")).unwrap();
        let f = GgufFile::open(&fixture("quant.gguf")).unwrap();
        // Rewrite the type id of `t_q8_0` to IQ2_XS (17) in a copy of the header.
        let key = b"t_q8_0";
        let at = bytes.windows(key.len()).position(|w| w == key).unwrap() + key.len();
        let n_dims = u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap()) as usize;
        let type_at = at + 4 + 8 * n_dims;
        assert_eq!(
            u32::from_le_bytes(bytes[type_at..type_at + 4].try_into().unwrap()),
            f.tensors["t_q8_0"].ggml_type
        );
        let mut bad = bytes.clone();
        bad[type_at..type_at + 4].copy_from_slice(&17u32.to_le_bytes());
        let p = dir.join("bad.gguf");
        std::fs::write(&p, &bad).unwrap();
        let err = GgufFile::open(&p)
            .unwrap()
            .tensor("t_q8_0")
            .unwrap_err()
            .to_string();
        assert!(err.contains("t_q8_0") && err.contains("IQ2_XS"), "{err}");
        std::fs::write(&p, &bytes[..100]).unwrap();
        assert!(GgufFile::open(&p).is_err());
        std::fs::write(&p, b"not a gguf file at all").unwrap();
        let err = GgufFile::open(&p).err().unwrap().to_string();
        assert!(err.contains("not a GGUF file"), "{err}");
        std::fs::remove_dir_all(&dir).ok();
    }
}
