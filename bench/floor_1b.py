"""Each pass of a partitioned Llama fit and score against its GEMM-bound floor, from the logs
(`bench/run_1b.sh`).

    python bench/floor_1b.py CONFIG FIT_LOG SCORE_LOG GEMM_TABLE [GEMM_TABLE ...]

The FLOPs are counted from the shapes exactly as `infl bench --passes-only` counts them (the
fast engine's `pass_flops`: each block's four products forward and backward, the attention
tiles, the LM head; `curvature::statistics_flops` for the partition's statistics). The score's
floor is its forward and backward only: at the default query rank its dots are below 1% of
those. The rate is the best "GEMM GF/s" of the `infl bench --engines-only` tables given (read
before and after the run, on the same machine): the strict reading.
"""
import json, re, sys

TILE = 64


def layers(c):
    d, f = c["hidden_size"], c["intermediate_size"]
    kv = d // c["num_attention_heads"] * c["num_key_value_heads"]
    out = []
    for b in range(c["num_hidden_layers"]):
        p = f"model.layers.{b}."
        out += [(p + "self_attn.q_proj", d, d), (p + "self_attn.k_proj", d, kv),
                (p + "self_attn.v_proj", d, kv), (p + "self_attn.o_proj", d, d),
                (p + "mlp.gate_proj", d, f), (p + "mlp.up_proj", d, f), (p + "mlp.down_proj", f, d)]
    return out  # (name, d_in, d_out)


def model_flops(c, n_seq, seq_len):
    """`pass_flops` for n_seq windows of seq_len tokens, one loss row fewer per window."""
    d, f, v = c["hidden_size"], c["intermediate_size"], c["vocab_size"]
    heads, hd = c["num_attention_heads"], d // c["num_attention_heads"]
    kv = hd * c["num_key_value_heads"]
    n = n_seq * seq_len
    lins = 2 * 2 * n * (d * (d + 2 * kv) + d * d + d * 2 * f + f * d)
    pairs = sum(min(TILE, seq_len - r) * min(r + TILE, seq_len) for r in range(0, seq_len, TILE))
    attention = n_seq * 7 * 2 * pairs * heads * hd
    head = 4 * n_seq * (seq_len - 1) * d * v
    return c["num_hidden_layers"] * (lins + attention) + head


def statistics_flops(kind, part, n):
    if kind == "covariance":
        return sum(n * (o * o + i * i) for _, i, o in part)
    return sum(2 * n * (o * o + i * i) + 2 * n * o * i for _, i, o in part)


def seconds(clock):
    m = re.fullmatch(r"(?:(\d+)h)?(?:(\d+)m)?([\d.]+)s?", clock)
    h, mi, s = m.groups()
    return int(h or 0) * 3600 + int(mi or 0) * 60 + float(s)


def passes(log):
    """(partition's first and last layer, pass name, tokens, seconds) per finished pass."""
    part, out = None, []
    for line in open(log, errors="replace").read().replace("\r", "\n").splitlines():
        m = re.match(r"partition \d+/\d+: \d+ layers \((\S+) … (\S+)\)", line)
        if m:
            part = m.groups()
        m = re.match(r"(.+?): done, (\d+) tokens in (\S+) \(", line)
        if m:
            out.append((part, m.group(1), int(m.group(2)), seconds(m.group(3))))
    return out


def gemm_rate(tables):
    rates = []
    for t in tables:
        for line in open(t):
            m = re.match(r"(gpt2|gpt_neox|llama)\S*\s+([\d.]+)\s", line)
            if m:
                rates.append(float(m.group(2)) * 1e9)
    return max(rates)


def main(config, fit_log, score_log, *tables):
    c = json.load(open(config))
    tracked = layers(c)
    names = [t[0] for t in tracked]
    rate = gemm_rate(tables)
    seq_len = 256
    print(f"best GEMM rate read: {rate / 1e9:.1f} GF/s")
    print(f"{'pass':<44} {'tokens':>7} {'time':>8} {'tokens/s':>9} {'GF/token':>9} {'floor/time':>10}")
    for log in (fit_log, score_log):
        for part, what, n, secs in passes(log):
            layers_in = tracked[names.index(part[0]):names.index(part[1]) + 1] if part else tracked
            flops = model_flops(c, n // seq_len, seq_len)
            kind = what.split()[0]
            if kind not in ("covariance", "eigenvalue", "scoring"):
                continue  # the queries' preconditioning is O(d³) per layer, not counted here
            if kind in ("covariance", "eigenvalue"):
                flops += statistics_flops(kind, layers_in, n)
            label = f"{what} ({len(layers_in)} layers)"
            print(f"{label:<44} {n:>7} {secs:>7.0f}s {n / secs:>9.1f} {flops / n / 1e9:>9.2f} "
                  f"{100 * flops / rate / secs:>9.0f}%")


if __name__ == "__main__":
    main(*sys.argv[1:])
