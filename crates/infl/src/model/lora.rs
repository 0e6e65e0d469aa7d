//! PEFT LoRA adapters on top of a loaded base model: reading an adapter directory
//! (`adapter_config.json` + `adapter_model.safetensors`), attaching each adapter's A and B to
//! the base linear layer it targets, and registering A and B as tracked layers.
//!
//! An adapted layer computes what PEFT's `lora.Linear.forward` computes at inference
//! (dropout is the identity there): `y = base(x) + B(A(x)) · scaling`, with
//! `scaling = lora_alpha / r` (or `lora_alpha / √r` with `use_rslora`). A and B are linear
//! layers of their own, as kronfluence sees PEFT's `lora_A`/`lora_B` modules: A's input is x,
//! B's input is `A x` (unscaled), and the scaling comes after B, so B's output gradient g is
//! `scaling · ∂L/∂y`. The taps are taken by [`super::autograd::Recorder::linear`] (GPT-2's
//! forward takes its own).
//!
//! GPT-2's Conv1D layers (weight stored `[in, out]`) are adapted the same way: PEFT sets
//! `fan_in_fan_out` for them, which only transposes the delta when merging; its forward is
//! the one above, with A `[r, in]` and B `[out, r]`. PEFT names them by the module tree
//! (`transformer.h.N.attn.c_attn`), whether or not the checkpoint's tensor names carry
//! `transformer.` ([`Target::key`]).
//!
//! Which modules are adapted is decided by the tensors in the file (PEFT writes exactly the
//! modules its `target_modules` and `layers_to_transform` matched); a tensor that targets no
//! linear layer of the model is refused, never ignored. The rank of each module is read from
//! its A (so `rank_pattern` needs no parsing); settings that change the forward in ways this
//! module does not compute (DoRA, trained biases, `alpha_pattern`, saved full modules) are
//! refused with the setting named.

use super::autograd::Linear;
use super::{ModuleSelection, TrackedLayer};
use crate::error::{Error, Result};
use candle_core::{DType, Device, Tensor};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};

/// The adapter's settings file inside the adapter directory.
pub const CONFIG_FILE: &str = "adapter_config.json";
/// The adapter's weights inside the adapter directory.
pub const WEIGHTS_FILE: &str = "adapter_model.safetensors";
/// PEFT's prefix of every key of a model wrapped by `get_peft_model`.
const KEY_PREFIX: &str = "base_model.model.";

/// The fields of `adapter_config.json` that change the forward. Every other field (dropout,
/// `task_type`, `target_modules`, `layers_to_transform`, `init_lora_weights`, …) is either
/// reflected in which tensors the file holds or irrelevant at inference.
#[derive(Debug, Clone, serde::Deserialize)]
struct PeftConfig {
    peft_type: Option<String>,
    r: usize,
    lora_alpha: f64,
    #[serde(default)]
    use_rslora: bool,
    #[serde(default)]
    use_dora: bool,
    #[serde(default)]
    bias: Option<String>,
    #[serde(default)]
    lora_bias: bool,
    #[serde(default)]
    alpha_pattern: BTreeMap<String, serde_json::Value>,
    #[serde(default)]
    modules_to_save: Option<serde_json::Value>,
    #[serde(default)]
    layer_replication: Option<serde_json::Value>,
    #[serde(default)]
    target_parameters: Option<serde_json::Value>,
}

/// A PEFT LoRA adapter read from its directory: per adapted module (the base layer's
/// checkpoint name), its A `[r, d_in]` and B `[d_out, r]` as f32 on the CPU.
pub struct Adapter {
    dir: PathBuf,
    lora_alpha: f64,
    use_rslora: bool,
    modules: BTreeMap<String, (Tensor, Tensor)>,
}

impl Adapter {
    /// Reads `dir/adapter_config.json` and `dir/adapter_model.safetensors`.
    pub fn open(dir: &Path) -> Result<Self> {
        let config_path = dir.join(CONFIG_FILE);
        let text = std::fs::read_to_string(&config_path).map_err(|e| {
            Error::input(format!(
                "{}: cannot read the adapter's config ({e}); --adapter must be a PEFT adapter \
                 directory (adapter_config.json + adapter_model.safetensors)",
                config_path.display()
            ))
        })?;
        let value: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| Error::input(format!("{}: invalid JSON: {e}", config_path.display())))?;
        let config: PeftConfig = super::parse_config(value, &config_path, "PEFT LoRA adapter")?;
        check_config(&config, &config_path)?;
        let weights_path = dir.join(WEIGHTS_FILE);
        if !weights_path.is_file() {
            return Err(Error::input(format!(
                "{}: the adapter's weights are missing (PyTorch adapter_model.bin files are \
                 not read; save the adapter with safe_serialization=True)",
                weights_path.display()
            )));
        }
        let tensors = candle_core::safetensors::load(&weights_path, &Device::Cpu).map_err(|e| {
            Error::input(format!(
                "{}: not a readable safetensors file: {e}",
                weights_path.display()
            ))
        })?;
        let modules = pair_tensors(tensors, &weights_path)?;
        Ok(Adapter {
            dir: dir.to_path_buf(),
            lora_alpha: config.lora_alpha,
            use_rslora: config.use_rslora,
            modules,
        })
    }

    /// The adapter directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The checkpoint names of the base layers the adapter modifies.
    pub fn targets(&self) -> impl Iterator<Item = &str> {
        self.modules.keys().map(String::as_str)
    }

    /// PEFT's scaling of a module of rank `r`.
    fn scaling(&self, r: usize) -> f64 {
        if self.use_rslora {
            self.lora_alpha / (r as f64).sqrt()
        } else {
            self.lora_alpha / r as f64
        }
    }

    /// Attaches the adapter to the model's linear `layers` (all of them, in the model's order)
    /// and returns the tracked layers renumbered in that order: each layer's own tracked layer
    /// if it was tracked, then its adapter's `lora_A` and `lora_B` when `modules` selects them
    /// ([`ModuleSelection::Adapter`], `All`, or the base layer's kind); and the adapter's
    /// parameter count.
    pub(crate) fn attach<'a, L: Adaptable + 'a>(
        &self,
        layers: impl IntoIterator<Item = &'a mut L>,
        modules: ModuleSelection,
    ) -> Result<(Vec<TrackedLayer>, usize)> {
        let mut tracked = Vec::new();
        let mut n_parameters = 0;
        let mut unused: BTreeSet<&str> = self.targets().collect();
        let mut register = |layer: TrackedLayer| {
            tracked.push(layer);
            tracked.len() - 1
        };
        for layer in layers {
            let t = layer.target()?;
            let (d_out, d_in) = (t.d_out, t.d_in);
            if t.tap.is_some() {
                *t.tap = Some(register(TrackedLayer {
                    name: t.name.to_string(),
                    d_in,
                    d_out,
                    has_bias: t.has_bias,
                }));
            }
            let Some((a, b)) = self.modules.get(&t.key) else {
                continue;
            };
            unused.remove(t.key.as_str());
            let r = a.dim(0)?;
            if a.dims() != [r, d_in] || b.dims() != [d_out, r] {
                return Err(Error::input(format!(
                    "{}: the adapter of `{}` has lora_A {:?} and lora_B {:?}, but the base \
                     layer is [{d_out}, {d_in}] (expected [r, {d_in}] and [{d_out}, r]): the \
                     adapter was trained on another model",
                    self.dir.display(),
                    t.key,
                    a.dims(),
                    b.dims()
                )));
            }
            n_parameters += a.elem_count() + b.elem_count();
            let keep = matches!(modules, ModuleSelection::All | ModuleSelection::Adapter)
                || modules == t.kind;
            let mut tap = |part: &str, d_in: usize, d_out: usize| {
                keep.then(|| {
                    register(TrackedLayer {
                        name: format!("{}.{part}", t.name),
                        d_in,
                        d_out,
                        has_bias: false,
                    })
                })
            };
            let (tap_a, tap_b) = (tap("lora_A", d_in, r), tap("lora_B", r, d_out));
            *t.lora = Some(Lora {
                a: a.to_device(t.device)?,
                b: b.to_device(t.device)?,
                scaling: self.scaling(r),
                tap_a,
                tap_b,
            });
        }
        if let Some(name) = unused.first() {
            return Err(Error::input(format!(
                "{}: the adapter modifies `{name}`, which is not a linear layer of this model's \
                 blocks: the adapter belongs to another model (or adapts embeddings or the LM \
                 head, which infl does not apply)",
                self.dir.display()
            )));
        }
        Ok((tracked, n_parameters))
    }
}

/// A base layer as [`Adapter::attach`] sees it: the names it goes by, its shape, and the
/// slots (its tap, its adapter) an attachment fills.
pub(crate) struct Target<'a> {
    /// The module's name in PEFT's keys (after `base_model.model.`): the name of the module
    /// in the transformers model, which a checkpoint's tensor names need not carry.
    pub key: String,
    /// The base layer's tracked-layer name; its lora_A and lora_B are named after it.
    pub name: &'a str,
    /// Attention or MLP: which `--modules` selects the layer and its adapter.
    pub kind: ModuleSelection,
    pub d_in: usize,
    pub d_out: usize,
    pub has_bias: bool,
    pub device: &'a Device,
    pub tap: &'a mut Option<usize>,
    pub lora: &'a mut Option<Lora>,
}

/// A linear layer of some storage layout that a LoRA adapter can modify.
pub(crate) trait Adaptable {
    fn target(&mut self) -> Result<Target<'_>>;
}

impl Adaptable for Linear {
    /// `nn.Linear`: weight `[out, in]`, named in PEFT's keys as in the checkpoint.
    fn target(&mut self) -> Result<Target<'_>> {
        let (d_out, d_in) = self.weight.dims2()?;
        Ok(Target {
            key: self.name.clone(),
            name: &self.name,
            kind: self.kind,
            d_in,
            d_out,
            has_bias: self.bias.is_some(),
            device: self.weight.device(),
            tap: &mut self.tap,
            lora: &mut self.lora,
        })
    }
}

/// A base layer's adapter as the forward uses it (on the base weights' device).
pub(crate) struct Lora {
    /// `[r, d_in]`.
    pub a: Tensor,
    /// `[d_out, r]`.
    pub b: Tensor,
    pub scaling: f64,
    /// Indices among the tracked layers of `lora_A` and `lora_B`, if tracked.
    pub tap_a: Option<usize>,
    pub tap_b: Option<usize>,
}

/// Refuses the settings whose forward this module does not compute.
fn check_config(c: &PeftConfig, path: &Path) -> Result<()> {
    let refuse = |what: &str| {
        Err(Error::input(format!(
            "{}: {what} is not supported (infl applies plain LoRA: y = W x + B A x · scaling)",
            path.display()
        )))
    };
    match c.peft_type.as_deref() {
        None | Some("LORA") => {}
        Some(other) => return refuse(&format!("peft_type `{other}` (only LORA)")),
    }
    if c.r == 0 {
        return refuse("r = 0");
    }
    if !c.lora_alpha.is_finite() {
        return refuse("a non-finite lora_alpha");
    }
    if c.use_dora {
        return refuse("use_dora = true (DoRA)");
    }
    if c.lora_bias {
        return refuse("lora_bias = true");
    }
    if c.bias.as_deref().is_some_and(|b| b != "none") {
        return refuse("bias other than \"none\" (trained base biases)");
    }
    if !c.alpha_pattern.is_empty() {
        return refuse("a non-empty alpha_pattern");
    }
    for (field, value) in [
        (
            "modules_to_save (fully trained modules)",
            &c.modules_to_save,
        ),
        ("layer_replication", &c.layer_replication),
        (
            "target_parameters (LoRA on bare parameters)",
            &c.target_parameters,
        ),
    ] {
        let empty = match value {
            None | Some(serde_json::Value::Null) => true,
            Some(serde_json::Value::Array(a)) => a.is_empty(),
            Some(_) => false,
        };
        if !empty {
            return refuse(field);
        }
    }
    Ok(())
}

/// Pairs `base_model.model.NAME.lora_A.weight` with `….lora_B.weight` per module NAME; any
/// other tensor (DoRA magnitudes, embedding adapters, saved modules) is refused by name.
fn pair_tensors(
    tensors: HashMap<String, Tensor>,
    path: &Path,
) -> Result<BTreeMap<String, (Tensor, Tensor)>> {
    let mut a_of = BTreeMap::new();
    let mut b_of = BTreeMap::new();
    for (key, t) in tensors {
        let bare = key.strip_prefix(KEY_PREFIX).unwrap_or(&key);
        let (module, side) = if let Some(m) = bare.strip_suffix(".lora_A.weight") {
            (m, &mut a_of)
        } else if let Some(m) = bare.strip_suffix(".lora_B.weight") {
            (m, &mut b_of)
        } else {
            return Err(Error::input(format!(
                "{}: tensor `{key}` is not a LoRA lora_A/lora_B weight (only plain LoRA on \
                 linear layers is supported)",
                path.display()
            )));
        };
        if t.rank() != 2 {
            return Err(Error::input(format!(
                "{}: tensor `{key}` has shape {:?}, not a matrix",
                path.display(),
                t.dims()
            )));
        }
        side.insert(module.to_string(), t.to_dtype(DType::F32)?);
    }
    let mut modules = BTreeMap::new();
    for (module, a) in a_of {
        let b = b_of.remove(&module).ok_or_else(|| {
            Error::input(format!(
                "{}: `{module}` has a lora_A but no lora_B",
                path.display()
            ))
        })?;
        modules.insert(module, (a, b));
    }
    if let Some(module) = b_of.keys().next() {
        return Err(Error::input(format!(
            "{}: `{module}` has a lora_B but no lora_A",
            path.display()
        )));
    }
    if modules.is_empty() {
        return Err(Error::input(format!(
            "{}: holds no LoRA weights",
            path.display()
        )));
    }
    Ok(modules)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::autograd::testing::*;
    use crate::model::autograd::Autograd;
    use crate::model::gpt2::Gpt2;
    use crate::model::llama::Llama;
    use crate::model::{Labels, TapModel};

    fn lora_fixture(name: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../tests/fixtures/lora")
            .join(name)
    }

    fn adapted(adapter: &Path, modules: ModuleSelection) -> Result<Llama> {
        let mut m = Llama::load(&fixture("llama"), modules)?;
        m.attach(&Adapter::open(adapter)?, modules)?;
        Ok(m)
    }

    #[test]
    fn taps_of_adapter_and_base_layers_match_finite_differences() {
        let m = adapted(&lora_fixture("qvd"), ModuleSelection::All).unwrap();
        // 7 base layers per block, and q, v, down adapted: 2 more each.
        assert_eq!(m.tracked().len(), 2 * (7 + 3 * 2));
        every_probe_receives_a_gradient(&m);
        taps_do_not_depend_on_padding(&m);
        taps_match_finite_differences(&m.tracked, |p| m.run(&batch(), Labels::Data, p).unwrap());
    }

    /// PEFT scales after B: B's input is A x unscaled, and B's output gradient is
    /// `scaling · ∂L/∂y` (y the adapted layer's output, whose gradient the base layer's tap is).
    #[test]
    fn scaling_sits_after_lora_b() {
        let m = adapted(&lora_fixture("qvd"), ModuleSelection::All).unwrap();
        let taps = m.taps(&batch(), Labels::Data).unwrap();
        let index = |name: &str| m.tracked().iter().position(|l| l.name == name).unwrap();
        let q = "model.layers.1.self_attn.q_proj";
        let (base, a, b) = (
            index(q),
            index(&format!("{q}.lora_A")),
            index(&format!("{q}.lora_B")),
        );
        let scaling = 8.0 / 4.0;
        for (gb, gy) in taps.layers[b].g.iter().zip(&taps.layers[base].g) {
            assert!(
                (gb - scaling * gy).abs() <= 1e-6 * (1.0 + gb.abs()),
                "{gb} vs {gy}"
            );
        }
        // lora_B's input is lora_A's output: A's input times Aᵀ.
        let lora = m.blocks[1].q.lora.as_ref().unwrap();
        let rows = taps.seq_lens.iter().sum::<usize>();
        let x = Tensor::from_vec(taps.layers[a].a.clone(), (rows, 16), &Device::Cpu).unwrap();
        let u = x
            .matmul(&lora.a.t().unwrap())
            .unwrap()
            .flatten_all()
            .unwrap();
        for (p, q) in u.to_vec1::<f32>().unwrap().iter().zip(&taps.layers[b].a) {
            assert!((p - q).abs() <= 1e-5 * (1.0 + p.abs()), "{p} vs {q}");
        }
        assert_eq!(taps.layers[a].a, taps.layers[base].a);
    }

    /// Copies the `qvd` adapter into a scratch directory with its config edited by `config`
    /// and its tensors by `tensors`.
    fn edited_adapter(
        name: &str,
        config: impl FnOnce(&mut serde_json::Value),
        tensors: impl FnOnce(&mut HashMap<String, Tensor>),
    ) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("infl-lora-{}-{name}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let src = lora_fixture("qvd");
        let text = std::fs::read_to_string(src.join(CONFIG_FILE)).unwrap();
        let mut c: serde_json::Value = serde_json::from_str(&text).unwrap();
        config(&mut c);
        std::fs::write(dir.join(CONFIG_FILE), c.to_string()).unwrap();
        let mut t = candle_core::safetensors::load(src.join(WEIGHTS_FILE), &Device::Cpu).unwrap();
        tensors(&mut t);
        candle_core::safetensors::save(&t, dir.join(WEIGHTS_FILE)).unwrap();
        dir
    }

    fn refusal(dir: &Path) -> String {
        let err = match adapted(dir, ModuleSelection::Adapter) {
            Ok(_) => panic!("{} was accepted", dir.display()),
            Err(e) => e,
        };
        std::fs::remove_dir_all(dir).ok();
        assert!(matches!(err, Error::Input(_)), "{err:?}");
        err.to_string()
    }

    #[test]
    fn adapters_whose_forward_differs_are_refused() {
        let q = "base_model.model.model.layers.0.self_attn.q_proj";
        let cases: Vec<(&str, PathBuf)> = vec![
            (
                "use_dora",
                edited_adapter("dora", |c| c["use_dora"] = true.into(), |_| {}),
            ),
            (
                "alpha_pattern",
                edited_adapter(
                    "alpha",
                    |c| c["alpha_pattern"] = serde_json::json!({"q_proj": 2}),
                    |_| {},
                ),
            ),
            (
                "modules_to_save",
                edited_adapter(
                    "save",
                    |c| c["modules_to_save"] = serde_json::json!(["lm_head"]),
                    |_| {},
                ),
            ),
            (
                "lm_head.weight",
                edited_adapter(
                    "extra",
                    |_| {},
                    |t| {
                        let w = Tensor::zeros((64, 16), DType::F32, &Device::Cpu).unwrap();
                        t.insert("base_model.model.lm_head.weight".into(), w);
                    },
                ),
            ),
            (
                "has a lora_A but no lora_B",
                edited_adapter(
                    "unpaired",
                    |_| {},
                    |t| {
                        t.remove(&format!("{q}.lora_B.weight"));
                    },
                ),
            ),
            (
                "another model",
                edited_adapter(
                    "shape",
                    |_| {},
                    |t| {
                        let a = Tensor::zeros((4, 8), DType::F32, &Device::Cpu).unwrap();
                        t.insert(format!("{q}.lora_A.weight"), a);
                    },
                ),
            ),
            (
                "model.layers.7.self_attn.q_proj",
                edited_adapter(
                    "layer",
                    |_| {},
                    |t| {
                        let q7 = q.replace("layers.0", "layers.7");
                        for side in ["lora_A", "lora_B"] {
                            let w = t[&format!("{q}.{side}.weight")].clone();
                            t.insert(format!("{q7}.{side}.weight"), w);
                        }
                    },
                ),
            ),
        ];
        for (says, dir) in cases {
            let err = refusal(&dir);
            assert!(err.contains(says), "{says}: {err}");
        }
    }

    #[test]
    fn rank_comes_from_the_tensors_and_rslora_scales_by_its_root() {
        let m = adapted(&lora_fixture("rslora"), ModuleSelection::Adapter).unwrap();
        // Block 1 only, all 7 linears, rank 2.
        assert_eq!(m.tracked().len(), 14);
        assert!(m.blocks[0].q.lora.is_none());
        let crate::model::llama::Mlp::Dense { down, .. } = &m.blocks[1].mlp else {
            panic!("dense")
        };
        let lora = down.lora.as_ref().unwrap();
        assert_eq!(lora.a.dims(), [2, 24]);
        assert!((lora.scaling - 3.0 / 2f64.sqrt()).abs() < 1e-12);
        assert_eq!(
            m.tracked()[0].name,
            "model.layers.1.self_attn.q_proj.lora_A"
        );
    }

    fn tiny_gpt2() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../assets/tiny-gpt2")
    }

    fn adapted_gpt2(dir: &Path, modules: ModuleSelection) -> Result<Gpt2> {
        let mut m = Gpt2::load(dir, modules)?;
        m.attach(&Adapter::open(&lora_fixture("gpt2"))?, modules)?;
        Ok(m)
    }

    /// A PEFT-style adapter directory (rank 2, alpha 3) on every Conv1D of
    /// `Gpt2::random(tiny_config())`, with deterministic non-zero A and B: small enough for
    /// finite differences in f32 (the bundled model's loss is too large for them).
    fn tiny_gpt2_adapter() -> PathBuf {
        let dir = std::env::temp_dir().join(format!("infl-lora-tiny-gpt2-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let config = serde_json::json!({"peft_type": "LORA", "r": 2, "lora_alpha": 3,
            "fan_in_fan_out": true, "target_modules": ["c_attn", "c_proj", "c_fc"]});
        std::fs::write(dir.join(CONFIG_FILE), config.to_string()).unwrap();
        let mut tensors = HashMap::new();
        let mut k = 0usize;
        let mut values = |shape: (usize, usize)| {
            let v: Vec<f32> = (0..shape.0 * shape.1)
                .map(|_| {
                    k += 1;
                    ((k * 7919) % 23) as f32 / 23.0 - 0.5
                })
                .collect();
            Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
        };
        for i in 0..2 {
            for (name, d_in, d_out) in [
                ("attn.c_attn", 8, 24),
                ("attn.c_proj", 8, 8),
                ("mlp.c_fc", 8, 32),
                ("mlp.c_proj", 32, 8),
            ] {
                let key = format!("{KEY_PREFIX}transformer.h.{i}.{name}");
                tensors.insert(format!("{key}.lora_A.weight"), values((2, d_in)));
                tensors.insert(format!("{key}.lora_B.weight"), values((d_out, 2)));
            }
        }
        candle_core::safetensors::save(&tensors, dir.join(WEIGHTS_FILE)).unwrap();
        dir
    }

    /// GPT-2's Conv1D layers with an adapter on all four of each block: the base layers'
    /// taps and lora_A/lora_B's, against finite differences; lora_B's g is
    /// `scaling · ∂L/∂y` (y the Conv1D's output, whose g the base layer's tap is).
    #[test]
    fn gpt2_taps_of_adapter_and_base_layers_match_finite_differences() {
        let dir = tiny_gpt2_adapter();
        let mut m = Gpt2::random(
            crate::model::gpt2::tests::tiny_config(),
            7,
            ModuleSelection::All,
        )
        .unwrap();
        m.attach(&Adapter::open(&dir).unwrap(), ModuleSelection::All)
            .unwrap();
        std::fs::remove_dir_all(&dir).ok();
        assert_eq!(m.tracked().len(), 2 * (4 + 4 * 2));
        assert_eq!(
            m.tracked()[1],
            TrackedLayer {
                name: "h.0.attn.c_attn.lora_A".into(),
                d_in: 8,
                d_out: 2,
                has_bias: false
            }
        );
        every_probe_receives_a_gradient(&m);
        taps_do_not_depend_on_padding(&m);
        taps_match_finite_differences(&m.tracked, |p| m.run(&batch(), Labels::Data, p).unwrap());
        let taps = m.taps(&batch(), Labels::Data).unwrap();
        for (gb, gy) in taps.layers[2].g.iter().zip(&taps.layers[0].g) {
            assert!(
                (gb - 1.5 * gy).abs() <= 1e-6 * (1.0 + gb.abs()),
                "{gb} vs {gy}"
            );
        }
    }

    /// PEFT names GPT-2's layers `transformer.h.N…` whatever the checkpoint's tensor names:
    /// the adapter applies to a checkpoint saved without the prefix (as openai-community/gpt2
    /// is), and the tracked layers keep the checkpoint's names.
    #[test]
    fn gpt2_adapter_applies_to_checkpoints_without_the_transformer_prefix() {
        let with = adapted_gpt2(&tiny_gpt2(), ModuleSelection::Adapter).unwrap();
        let dir = std::env::temp_dir().join(format!("infl-lora-gpt2-{}", std::process::id()));
        Gpt2::load(&tiny_gpt2(), ModuleSelection::All)
            .unwrap()
            .save(&dir)
            .unwrap();
        let without = adapted_gpt2(&dir, ModuleSelection::Adapter).unwrap();
        std::fs::remove_dir_all(&dir).ok();
        assert_eq!(without.tracked()[0].name, "h.0.attn.c_attn.lora_A");
        assert_eq!(without.tracked().len(), 16);
        let ids = [3u32, 1, 4, 1, 5];
        assert_eq!(with.logits(&ids).unwrap(), without.logits(&ids).unwrap());
    }

    #[test]
    fn adapters_of_other_architectures_are_refused_on_gpt2() {
        let mut m = Gpt2::load(&tiny_gpt2(), ModuleSelection::Adapter).unwrap();
        let err = m
            .attach(
                &Adapter::open(&lora_fixture("qvd")).unwrap(),
                ModuleSelection::Adapter,
            )
            .err()
            .unwrap();
        assert!(matches!(err, Error::Input(_)), "{err:?}");
        assert!(
            err.to_string()
                .contains("modifies `model.layers.0.mlp.down_proj`"),
            "{err}"
        );
    }
}
