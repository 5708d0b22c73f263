"""``rpe privacy``: plan, calibrate and account a site's differential privacy (``common.privacy``).

    rpe privacy epsilon --noise-multiplier 1.0            # ε of one Gaussian release of z
    rpe privacy epsilon --epsilon 4                       # the noise multiplier that gives ε = 4
    rpe privacy epsilon --noise-multiplier 1 --sample-rate 0.06 --steps 40   # DP-SGD's ε
    rpe privacy z-norms --data site/train.jsonl           # choose z-clip from the site's own data
    rpe privacy spent --egress site/egress.jsonl          # ε spent over everything that left the site
"""

from __future__ import annotations

import argparse
import json
import math
from typing import Any


def cmd_epsilon(args: argparse.Namespace) -> None:
    from common.privacy import calibrate_gaussian, composed_epsilon, gaussian_epsilon

    if (args.noise_multiplier is None) == (args.epsilon is None):
        from common.cli import CliError

        raise CliError("rpe privacy epsilon: give exactly one of --noise-multiplier or --epsilon")
    if args.epsilon is not None:
        sigma = calibrate_gaussian(args.epsilon, args.delta)
        print(f"noise multiplier {sigma:.4f} makes one Gaussian release (ε={args.epsilon:g}, δ={args.delta:g})-DP; "
              f"node config: z-epsilon = {args.epsilon:g} (or z-noise-multiplier = {sigma:.4f})")
        return
    if args.steps > 1 or args.sample_rate < 1.0:
        eps = composed_epsilon([(args.noise_multiplier, args.sample_rate, args.steps)], args.delta)
        how = f"{args.steps} steps at sample rate {args.sample_rate:g} (RDP accountant)"
    else:
        eps = gaussian_epsilon(args.noise_multiplier, args.delta)
        how = "one release (analytic Gaussian mechanism)"
    print(f"ε = {eps:.4f} at δ = {args.delta:g} for noise multiplier {args.noise_multiplier:g}, {how}")


def cmd_z_norms(args: argparse.Namespace) -> None:
    import numpy as np

    from client.app import load_site_data
    from common.embedding import mean_embedding
    from common.models import load_base_model
    from common.tasks import TextReportTask

    data = load_site_data(args.data)
    texts = TextReportTask().embedding_texts(data.all)
    model, tok = load_base_model(args.model)
    emb = mean_embedding(model, tok, texts, layer=args.layer, return_sums=True)
    norms = emb.example_norms if emb.example_norms is not None else np.zeros(0)
    qs = {q: float(np.percentile(norms, q)) for q in (10, 50, 90, 99, 100)}
    print(f"{len(norms)} reports, {emb.n_tokens} tokens; L2 norm of each report's token sum at layer {emb.layer}:")
    print("  " + "  ".join(f"p{q}={v:,.1f}" for q, v in qs.items()))
    print(f"z-clip at the median ({qs[50]:,.1f}) scales half the reports down and keeps noise small; at p90 "
          f"({qs[90]:,.1f}) z is nearly the non-private z but the noise is {qs[90] / max(qs[50], 1e-12):.1f}x "
          "larger. The noise on z has std z-noise-multiplier x z-clip / total tokens per dimension.")
    print("These numbers describe private data: keep them at the site.")


def cmd_spent(args: argparse.Namespace) -> None:
    from common.privacy import read_egress, spent_from_egress

    spent = spent_from_egress(read_egress(args.egress), args.delta)
    if args.json:
        print(json.dumps({"epsilon": None if math.isinf(spent.epsilon) else spent.epsilon, "delta": spent.delta,
                          "releases": spent.releases, "non_private": spent.non_private}, indent=1))
    else:
        print(spent.summary())


def add_commands(sub: Any) -> None:
    """Register ``rpe privacy ...`` on the top-level subparsers."""
    p = sub.add_parser("privacy", help="differential privacy: calibrate noise, choose z-clip, account ε spent",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    psub = p.add_subparsers(dest="privacy_command", required=True)

    e = psub.add_parser("epsilon", help="ε for a noise multiplier, or the noise multiplier for a target ε")
    e.add_argument("--noise-multiplier", type=float, help="noise std / sensitivity (σ)")
    e.add_argument("--epsilon", type=float, help="target ε for one release: prints the σ that achieves it")
    e.add_argument("--delta", type=float, default=1e-5, help="δ (default 1e-5; keep it below 1/number of reports)")
    e.add_argument("--sample-rate", type=float, default=1.0, help="DP-SGD: batch size / number of reports")
    e.add_argument("--steps", type=int, default=1, help="DP-SGD: training steps")
    e.set_defaults(func=cmd_epsilon)

    z = psub.add_parser("z-norms", help="distribution of per-report token-sum norms, to choose node config z-clip")
    z.add_argument("--data", required=True, type=_path, help="the site's JSONL file or data directory")
    z.add_argument("--model", default="smollm2-135m-instruct", help="base model directory or name")
    z.add_argument("--layer", type=int, default=-1, help="hidden-state layer of z (default -1, as enrolment)")
    z.set_defaults(func=cmd_z_norms)

    s = psub.add_parser("spent", help="ε spent over every release in a site's egress log (RDP composition)")
    s.add_argument("--egress", required=True, help="the site's egress.jsonl")
    s.add_argument("--delta", type=float, default=1e-5, help="δ of the total (default 1e-5)")
    s.add_argument("--json", action="store_true", help="machine-readable output")
    s.set_defaults(func=cmd_spent)


def _path(value: str) -> Any:
    from pathlib import Path

    p = Path(value).expanduser()
    if not p.exists():
        raise argparse.ArgumentTypeError(f"{p} does not exist")
    return p
