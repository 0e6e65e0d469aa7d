//! The report's per-expert view of a mixture of experts: the per-layer parts of a query's
//! scores grouped by expert block and expert (an expert's part is the sum of its linear
//! layers' parts, LoRA adapters on them included), so that a reader sees which experts carried
//! the query's influence.

use super::html::{escape, fmt_score};
use std::fmt::Write as _;

/// Where a tracked layer sits in an expert block: `<block>.experts.<e>.<linear>` is expert
/// `e` of `<block>`; `<block>.shared_expert.<linear>` and `<block>.shared_expert_gate` its
/// shared expert. `None` for every other layer (the router included: it is not an expert).
fn expert_of(name: &str) -> Option<(&str, Member)> {
    if let Some((block, rest)) = name.split_once(".experts.") {
        let e = rest.split('.').next()?.parse().ok()?;
        return Some((block, Member::Routed(e)));
    }
    let (block, _) = name.split_once(".shared_expert")?;
    Some((block, Member::Shared))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Member {
    Routed(usize),
    Shared,
}

/// One expert block's experts and their parts, in expert order (the shared expert last).
#[derive(Debug, PartialEq)]
struct Block {
    name: String,
    experts: Vec<(Member, f64)>,
}

/// Sums `parts` (one per layer of `names`) per expert; blocks in their order of appearance.
fn group(names: &[String], parts: &[f64]) -> Vec<Block> {
    let mut blocks: Vec<Block> = Vec::new();
    for (name, part) in names.iter().zip(parts) {
        let Some((block, member)) = expert_of(name) else {
            continue;
        };
        let i = match blocks.iter().position(|b| b.name == block) {
            Some(i) => i,
            None => {
                blocks.push(Block {
                    name: block.to_string(),
                    experts: Vec::new(),
                });
                blocks.len() - 1
            }
        };
        let experts = &mut blocks[i].experts;
        match experts.iter_mut().find(|(m, _)| *m == member) {
            Some((_, v)) => *v += part,
            None => experts.push((member, *part)),
        }
    }
    for b in &mut blocks {
        b.experts.sort_by_key(|(m, _)| *m);
    }
    blocks
}

/// An HTML table of the experts' parts of `parts` (what the per-layer chart above it shows),
/// the largest magnitude per block in bold; empty when no layer belongs to an expert.
pub(super) fn experts_table(names: &[String], parts: &[f64], what: &str) -> String {
    let blocks = group(names, parts);
    if blocks.is_empty() {
        return String::new();
    }
    let mut h =
        String::from("<table class=\"experts\"><tr><th>expert block</th><th>experts</th></tr>");
    for b in &blocks {
        let largest = b.experts.iter().map(|(_, v)| v.abs()).fold(0.0, f64::max);
        let cells: Vec<String> = b
            .experts
            .iter()
            .map(|(m, v)| {
                let label = match m {
                    Member::Routed(e) => format!("expert {e}"),
                    Member::Shared => "shared".to_string(),
                };
                let text = format!("{label}: {}", escape(&fmt_score(*v)));
                if v.abs() == largest && largest > 0.0 {
                    format!("<b>{text}</b>")
                } else {
                    text
                }
            })
            .collect();
        let _ = write!(
            h,
            "<tr><td><code>{}</code></td><td>{}</td></tr>",
            escape(&b.name),
            cells.join(" &nbsp;· ")
        );
    }
    let _ = write!(
        h,
        "</table><div class=\"legend\">Experts: {what}, summed over each expert's linear layers (bold: the expert carrying the most).</div>"
    );
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parts_are_summed_per_expert_and_the_router_is_left_out() {
        let names: Vec<String> = [
            "model.layers.0.mlp.gate",
            "model.layers.0.mlp.experts.1.gate_proj",
            "model.layers.0.mlp.experts.0.down_proj",
            "model.layers.0.mlp.experts.1.down_proj.lora_B",
            "model.layers.0.mlp.shared_expert.up_proj",
            "model.layers.0.mlp.shared_expert_gate",
            "model.layers.1.self_attn.q_proj",
            "model.layers.1.block_sparse_moe.experts.10.w2",
        ]
        .map(String::from)
        .to_vec();
        let parts = [100.0, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0, -64.0];
        let blocks = group(&names, &parts);
        assert_eq!(
            blocks,
            vec![
                Block {
                    name: "model.layers.0.mlp".into(),
                    experts: vec![
                        (Member::Routed(0), 2.0),
                        (Member::Routed(1), 5.0),
                        (Member::Shared, 24.0)
                    ],
                },
                Block {
                    name: "model.layers.1.block_sparse_moe".into(),
                    experts: vec![(Member::Routed(10), -64.0)],
                },
            ]
        );
        let html = experts_table(&names, &parts, "signed totals");
        assert!(html.contains("<b>shared: +24.00</b>"), "{html}");
        assert!(html.contains("expert 1: +5.000"), "{html}");
        assert!(experts_table(&names[6..7], &parts[6..7], "x").is_empty());
    }
}
