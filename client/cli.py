"""``rpe`` sub-commands of a site: embed, keygen, privacy.

``register(subparsers)`` adds them to the top-level parser that ``deploy.cli`` builds. They run at a
hospital, so they import only ``client`` and ``common`` (never the coordinator's code), and heavy
modules only inside each command so that ``rpe --help`` stays instant.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

from common.cli_base import CliError
from common.families import DEFAULT_FAMILY

PRIVACY_DESCRIPTION = (
    "``rpe privacy``: plan, calibrate and account a site's differential privacy (``common.privacy``).\n"
    """
    rpe privacy epsilon --noise-multiplier 1.0            # ε of one Gaussian release of z
    rpe privacy epsilon --epsilon 4                       # the noise multiplier that gives ε = 4
    rpe privacy epsilon --noise-multiplier 1 --sample-rate 0.06 --steps 40   # DP-SGD's ε
    rpe privacy z-norms --data site/train.jsonl           # choose z-clip from the site's own data
    rpe privacy spent --egress site/egress.jsonl          # ε spent over everything that left the site
"""
)


def cmd_embed(args: argparse.Namespace) -> None:
    """z of any family from a site's data (``Family.examples_from`` + ``Family.embed``), with the
    site's Gaussian mechanism when asked: the z a site would release for an embedding query."""
    import numpy as np

    mech = _z_mechanism(args)  # first: it refuses noise options for minilm
    source = Path(args.images or args.data)
    from contextlib import nullcontext

    from common.embedding import quiet

    with quiet() if args.quiet else nullcontext():  # --quiet: no bar, also where the family draws one
        if args.representation == "minilm":
            res = _minilm_embedding(args, source)
        else:
            res = _family_embedding(args, source, mech.clip if mech else None)
    z = res.z if mech is None else mech.apply(res.z, res.n_tokens)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    np.save(out, z.astype(np.float32))
    summary = {
        "out": str(out),
        "family": args.family,
        "dim": int(res.z.shape[0]),
        "examples": res.n_examples,
        "tokens": res.n_tokens,
        "representation": res.representation,
        "layer": res.layer,
    }
    if mech is not None:
        summary["privacy"] = mech.record()
    print(
        json.dumps(summary)
        if args.json
        else f"wrote {out}: z of dim {summary['dim']} over {res.n_examples} examples / {res.n_tokens} tokens"
    )


def _family_embedding(args: argparse.Namespace, source: Path, clip_norm: float | None) -> Any:
    """z before noise from the family's own reader and encoder (its frozen base model)."""
    import tempfile

    from common.families import UnknownFamilyError, get_family
    from common.families.base import FamilyError, SiteInputs

    try:
        family = get_family(args.family)
    except UnknownFamilyError as exc:
        raise CliError(f"--family: {exc}") from None
    model = args.model or family.default_model
    if not model:
        raise CliError(f"--model: the {family.name} family has no default base model; name one")
    try:
        examples = family.examples_from(source)
    except (FamilyError, OSError, ValueError) as exc:
        said = str(exc)  # the reader's message names the file already: say it once
        named = said.startswith(f"{source}:") or said.endswith(f" {source}")
        raise CliError(said if named else f"{source}: {said}") from None
    if not examples:
        raise CliError(f"{source} holds no {family.name} examples to embed")
    if family.z_states(SiteInputs("cli", source, model, source)) <= 1 and args.layer != -1:
        raise CliError(f"--layer: a {family.name} z is its base model's output; use -1")
    with tempfile.TemporaryDirectory(prefix="rpe-embed-") as work:
        inputs = SiteInputs("cli", source, model, Path(work))
        return family.embed(family.load_base(inputs), inputs, examples, args.layer, clip_norm)


def _minilm_embedding(args: argparse.Namespace, source: Path) -> Any:
    """The MiniLM sentence embedding of a report file (the report family's alternative z)."""
    from common.embedding import sentence_embedding
    from common.families.report.data import read_jsonl
    from common.families.report.task import TextReportTask

    if args.family != DEFAULT_FAMILY:
        raise CliError(f"--representation minilm embeds report text; it is not a z of the {args.family} family")
    return sentence_embedding(TextReportTask().embedding_texts(read_jsonl(source)), progress=not args.quiet)


def _z_mechanism(args: argparse.Namespace) -> Any:
    """The Gaussian mechanism asked for on the command line (``--z-clip`` with a noise level), or None."""
    from common.privacy import PrivacyConfigError, ZMechanism

    policy = {
        k: v
        for k, v in (
            ("z-clip", args.z_clip),
            ("z-noise-multiplier", args.z_noise_multiplier),
            ("z-epsilon", args.z_epsilon),
            ("z-delta", args.z_delta),
        )
        if v is not None
    }
    if policy and args.representation != "hidden-mean":
        raise CliError("the Gaussian mechanism on z is implemented for --representation hidden-mean only")
    try:
        return ZMechanism.from_policy(policy)
    except PrivacyConfigError as exc:
        import re

        raise CliError(re.sub(r"'(z-[a-z-]+)'", r"--\1", str(exc).replace("node config ", ""))) from None


def cmd_keygen(args: argparse.Namespace) -> None:
    from common.trust.signing import generate_keypair

    priv, pub = generate_keypair(args.out, args.site)
    print(f"private key {priv} (keep it at the site)\npublic key  {pub} (give it to the coordinator)")


def cmd_epsilon(args: argparse.Namespace) -> None:
    from common.privacy import calibrate_gaussian, composed_epsilon, gaussian_epsilon

    if (args.noise_multiplier is None) == (args.epsilon is None):
        raise CliError("rpe privacy epsilon: give exactly one of --noise-multiplier or --epsilon")
    if args.epsilon is not None:
        sigma = calibrate_gaussian(args.epsilon, args.delta)
        print(
            f"noise multiplier {sigma:.4f} makes one Gaussian release (ε={args.epsilon:g}, δ={args.delta:g})-DP; "
            f"node config: z-epsilon = {args.epsilon:g} (or z-noise-multiplier = {sigma:.4f})"
        )
        return
    if args.steps > 1 or args.sample_rate < 1.0:
        eps = composed_epsilon([(args.noise_multiplier, args.sample_rate, args.steps)], args.delta)
        how = f"{args.steps} steps at sample rate {args.sample_rate:g} (RDP accountant)"
    else:
        eps = gaussian_epsilon(args.noise_multiplier, args.delta)
        how = "one release (analytic Gaussian mechanism)"
    print(f"ε = {eps:.4f} at δ = {args.delta:g} for noise multiplier {args.noise_multiplier:g}, {how}")


def cmd_z_norms(args: argparse.Namespace) -> None:
    """The distribution of the per-example vector norms (each example's contribution to z before
    clipping: ``Family.embed``'s ``example_sums``), to choose the node config's ``z-clip``."""
    import numpy as np

    from common.families import get_family

    res = _family_embedding(args, Path(args.images or args.data), None)
    unit = get_family(args.family).unit
    norms = res.example_norms if res.example_norms is not None else np.zeros(0)
    if not len(norms):
        raise CliError(f"the {args.family} family gave no per-{unit} vectors to measure")
    qs = {q: float(np.percentile(norms, q)) for q in (10, 50, 90, 99, 100)}
    where = f" at layer {res.layer}" if res.layer is not None else ""
    print(f"{len(norms)} {unit}s, {res.n_tokens} tokens; L2 norm of each {unit}'s vector (before clipping){where}:")
    print("  " + "  ".join(f"p{q}={v:,.1f}" for q, v in qs.items()))
    print(
        f"z-clip at the median ({qs[50]:,.1f}) scales half the {unit}s down and keeps noise small; at p90 "
        f"({qs[90]:,.1f}) z is nearly the non-private z but the noise is {qs[90] / max(qs[50], 1e-12):.1f}x "
        "larger. The noise on z has std z-noise-multiplier x z-clip / total tokens per dimension."
    )
    print("These numbers describe private data: keep them at the site.")


def cmd_spent(args: argparse.Namespace) -> None:
    from common.privacy import read_egress, spent_from_egress

    spent = spent_from_egress(read_egress(args.egress), args.delta)
    if args.json:  # strict JSON, as `rpe site status --json`: ε = ∞ is the string "inf", never null/Infinity
        eps: float | str = "inf" if math.isinf(spent.epsilon) else spent.epsilon
        print(
            json.dumps(
                {
                    "epsilon": eps,
                    "delta": spent.delta,
                    "releases": spent.releases,
                    "non_private": spent.non_private,
                },
                indent=1,
                allow_nan=False,
            )
        )
    else:
        print(spent.summary())


def register(sub: Any) -> None:
    """Add the site's commands to the top-level ``rpe`` subparsers."""
    e = sub.add_parser(
        "embed",
        help="compute a site's embedding z for any task family (site side)",
        description="z of a site's data as the family computes it for an embedding query: for "
        "reports (--family report-text, the default) the mean of a hidden layer of the frozen base "
        "model over all non-padding tokens (JSONL with 'prompt' fields); for segmentation "
        "(--family segmentation --images DIR) the mean of the frozen encoder's output over the images. "
        "Labels are never read.",
    )
    src = e.add_mutually_exclusive_group(required=True)
    src.add_argument("--data", help="the site's data: a JSONL file or data directory (reports)")
    src.add_argument("--images", help="a folder of images (or one image) for an image family")
    e.add_argument("--family", default=DEFAULT_FAMILY, help=f"task family (default {DEFAULT_FAMILY})")
    e.add_argument("--out", required=True, help="where to write z (.npy)")
    e.add_argument("--model", default=None, help="base model directory or name (default: the family's)")
    e.add_argument("--representation", choices=["hidden-mean", "minilm"], default="hidden-mean")
    e.add_argument("--layer", type=int, default=-1)
    e.add_argument("--quiet", action="store_true", help="no progress bar")
    e.add_argument("--json", action="store_true")
    e.add_argument(
        "--z-clip",
        type=float,
        help="Gaussian mechanism: L2 bound on each example's vector (a report's token sum) "
        "(`rpe privacy z-norms` helps choose it); needs --z-epsilon or --z-noise-multiplier",
    )
    e.add_argument("--z-epsilon", type=float, help="target ε of this z (σ is calibrated)")
    e.add_argument("--z-noise-multiplier", type=float, help="noise std / z-clip (instead of --z-epsilon)")
    e.add_argument("--z-delta", type=float, help="δ (default 1e-5)")
    e.set_defaults(func=cmd_embed)

    k = sub.add_parser(
        "keygen",
        help="create a site's Ed25519 signing key pair",
        description="Writes SITE.key (private, mode 0600) and SITE.pub into --out.",
    )
    k.add_argument("--site", required=True)
    k.add_argument("--out", required=True, help="directory for the key files")
    k.set_defaults(func=cmd_keygen)

    p = sub.add_parser(
        "privacy",
        help="differential privacy: calibrate noise, choose z-clip, account ε spent",
        description=PRIVACY_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    psub = p.add_subparsers(dest="privacy_command", required=True)

    e = psub.add_parser("epsilon", help="ε for a noise multiplier, or the noise multiplier for a target ε")
    e.add_argument("--noise-multiplier", type=float, help="noise std / sensitivity (σ)")
    e.add_argument("--epsilon", type=float, help="target ε for one release: prints the σ that achieves it")
    e.add_argument("--delta", type=float, default=1e-5, help="δ (default 1e-5; keep it below 1/number of reports)")
    e.add_argument("--sample-rate", type=float, default=1.0, help="DP-SGD: batch size / number of reports")
    e.add_argument("--steps", type=int, default=1, help="DP-SGD: training steps")
    e.set_defaults(func=cmd_epsilon)

    z = psub.add_parser(
        "z-norms", help="distribution of per-example vector norms (a report's token sum), to choose z-clip"
    )
    zsrc = z.add_mutually_exclusive_group(required=True)
    zsrc.add_argument("--data", type=_path, help="the site's data: a JSONL file or data directory (reports)")
    zsrc.add_argument("--images", type=_path, help="a folder of images for an image family")
    z.add_argument("--family", default=DEFAULT_FAMILY, help=f"task family (default {DEFAULT_FAMILY})")
    z.add_argument("--model", default=None, help="base model directory or name (default: the family's)")
    z.add_argument("--layer", type=int, default=-1, help="hidden-state layer of z (default -1, as enrolment)")
    z.set_defaults(func=cmd_z_norms)

    s = psub.add_parser(
        "spent",
        help="ε spent over every release in a site's egress log (RDP composition)",
        description="ε spent over every data-derived release in a site's egress log (RDP composition). "
        "One release without differential privacy (e.g. metrics on held-out data) makes the total "
        'unbounded: ε = ∞, which --json prints as the string "inf" (as `rpe site status --json`), '
        "with every such release listed under non_private.",
    )
    s.add_argument("--egress", required=True, help="the site's egress.jsonl")
    s.add_argument("--delta", type=float, default=1e-5, help="δ of the total (default 1e-5)")
    s.add_argument(
        "--json",
        action="store_true",
        help='strict JSON: {epsilon, delta, releases, non_private}; ε = ∞ is "inf" (a release\'s own '
        "epsilon is null when it was not private)",
    )
    s.set_defaults(func=cmd_spent)


def _path(value: str) -> Any:
    p = Path(value).expanduser()
    if not p.exists():
        raise argparse.ArgumentTypeError(f"{p} does not exist")
    return p
