"""``rpe``: the command line of the RPE federation (registry, embeddings, composition, audit).

Site-side commands (``embed``, ``keygen``) and coordinator-side commands (``registry``,
``compose``, ``audit``) share one entry point; heavy modules are imported inside each command so
that ``rpe --help`` is instant and a site never imports the coordinator's code.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("ANONYMIZED_TELEMETRY", "False")


class CliError(Exception):
    """A user error: printed as one line, exit status 2."""


def _print_table(rows: list[dict[str, Any]], columns: list[str]) -> None:
    if not rows:
        print("(none)")
        return
    cells = [[_fmt(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    print("  ".join("-" * w for w in widths))
    for row in cells:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths)))


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "" if value is None else str(value)


def _load_z(path: str) -> Any:
    import numpy as np

    p = Path(path)
    if not p.exists():
        raise CliError(f"embedding file {p} does not exist; create one with `rpe embed --out {p}`")
    try:
        z = np.load(p, allow_pickle=False)
    except ValueError as exc:
        raise CliError(f"{p} is not a .npy array ({exc}); write it with numpy.save or `rpe embed`") from exc
    if z.ndim != 1:
        raise CliError(f"{p} holds an array of shape {z.shape}; expected one vector (1-D)")
    return z


_BLOB_KEY_HELP = ("AES-256-GCM key file of an encrypted registry (`rpe blob-key new FILE`; default: "
                  "$RPE_BLOB_KEY_FILE, else $RPE_BLOB_KEY); needed to add or read adapters, not to list")


def _blob_key(args: argparse.Namespace) -> Any:
    """The key named by --blob-key-file, else the environment's (None: none configured)."""
    from server.registry.blobcrypt import load_blob_key

    return load_blob_key(getattr(args, "blob_key_file", None) or None)


def _open_registry(args: argparse.Namespace) -> Any:
    from server.registry import Registry

    return Registry(args.registry, blob_key=_blob_key(args))


# ---------------------------------------------------------------------------------------------
# registry
# ---------------------------------------------------------------------------------------------


def cmd_registry_init(args: argparse.Namespace) -> None:
    from common.models import fingerprint, linear_module_shapes, load_base_model, resolve_model_dir
    from server.registry import Registry

    model_dir = resolve_model_dir(args.base)
    model, _ = load_base_model(model_dir)
    if args.representation == "minilm":
        dim, representation = 384, "minilm"
    else:
        dim, representation = int(model.config.hidden_size), f"hidden-mean:layer={args.layer}"
    reg = Registry.init(
        args.registry, base_fingerprint=fingerprint(model_dir), module_shapes=linear_module_shapes(model),
        embedding_dim=dim, representation=representation, chroma_host=args.chroma_host,
        chroma_port=args.chroma_port, base_name=str(args.base), blob_key=_blob_key(args),
    )
    enc = reg.blob_encryption
    print(f"registry {args.registry}: base {fingerprint(model_dir)[:19]}…, z dim {dim} ({representation})"
          + (f", blobs encrypted ({enc['alg']}, key {enc['key_id']})" if enc else ""))
    reg.close()


def cmd_blob_key_new(args: argparse.Namespace) -> None:
    from server.registry.blobcrypt import KEY_FILE_ENV, new_key_file

    key = new_key_file(args.file)
    print(f"wrote blob key {key.key_id} to {args.file} (mode 0600; keep a backup: blobs encrypted with it are "
          "unreadable without it)")
    print(f"use it: rpe registry init --registry DIR --blob-key-file {args.file}; then pass --blob-key-file "
          f"{args.file} (or set {KEY_FILE_ENV}={args.file}) to every rpe command on that registry, and run config "
          f"blob-key-file=\"{args.file}\" for the ServerApp")


def cmd_registry_add(args: argparse.Namespace) -> None:
    from common.lora import load_peft_adapter
    from server.registry import AdapterMeta

    reg = _open_registry(args)
    try:
        adapter = load_peft_adapter(args.adapter)
        z = _load_z(args.embedding)
        base = args.base_fingerprint or next(iter(reg.bases))
        meta = AdapterMeta(site=args.site, task=args.task, modality=args.modality, base_fingerprint=base,
                           sample_count=args.samples)
        rec = reg.add(adapter, z, meta)
    finally:
        reg.close()
    print(json.dumps(rec.to_dict(), indent=2) if args.json else f"added {rec.id} ({rec.bytes} bytes)")


def cmd_registry_ls(args: argparse.Namespace) -> None:
    reg = _open_registry(args)
    try:
        records = reg.list(task=args.task, modality=args.modality, site=args.site)
    finally:
        reg.close()
    if args.json:
        print(json.dumps([r.to_dict() for r in records], indent=2))
        return
    rows = [{"id": r.id, "site": r.meta.site, "task": r.meta.task, "modality": r.meta.modality,
             "rank": r.meta.rank, "samples": r.meta.sample_count, "bytes": r.bytes,
             "created": r.meta.created_at} for r in records]
    _print_table(rows, ["id", "site", "task", "modality", "rank", "samples", "bytes", "created"])


def cmd_registry_show(args: argparse.Namespace) -> None:
    reg = _open_registry(args)
    try:
        rec = reg.get(args.id)
    finally:
        reg.close()
    print(json.dumps(rec.to_dict(with_z=args.z), indent=2))


def cmd_registry_rm(args: argparse.Namespace) -> None:
    reg = _open_registry(args)
    try:
        rec = reg.remove(args.id, reason=args.reason)
    finally:
        reg.close()
    print(f"removed {rec.id} (blob {rec.blob_sha256[:12]}… kept for the audit trail; `gc` deletes it)")


# ---------------------------------------------------------------------------------------------
# site side
# ---------------------------------------------------------------------------------------------


def cmd_embed(args: argparse.Namespace) -> None:
    import numpy as np

    from common.data import read_jsonl
    from common.tasks import TextReportTask

    examples = read_jsonl(args.data)
    task = TextReportTask()
    texts = task.embedding_texts(examples)
    if args.representation == "minilm":
        from common.embedding import sentence_embedding

        res = sentence_embedding(texts, progress=not args.quiet)
    else:
        from common.embedding import mean_embedding
        from common.models import load_base_model

        mech = _z_mechanism(args)
        model, tok = load_base_model(args.model)
        res = mean_embedding(model, tok, texts, layer=args.layer, max_length=args.max_length,
                             progress=not args.quiet, clip_norm=mech.clip if mech else None)
    z = res.z if mech is None else mech.apply(res.z, res.n_tokens)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    np.save(out, z.astype(np.float32))
    summary = {"out": str(out), "dim": int(res.z.shape[0]), "examples": res.n_examples, "tokens": res.n_tokens,
               "representation": res.representation, "layer": res.layer}
    if mech is not None:
        summary["privacy"] = mech.record()
    print(json.dumps(summary) if args.json else
          f"wrote {out}: z of dim {summary['dim']} over {res.n_examples} examples / {res.n_tokens} tokens")


def _z_mechanism(args: argparse.Namespace) -> Any:
    """The Gaussian mechanism asked for on the command line (``--z-clip`` with a noise level), or None."""
    from common.privacy import PrivacyConfigError, ZMechanism

    policy = {k: v for k, v in (("z-clip", args.z_clip), ("z-noise-multiplier", args.z_noise_multiplier),
                                ("z-epsilon", args.z_epsilon), ("z-delta", args.z_delta)) if v is not None}
    if policy and args.representation != "hidden-mean":
        raise CliError("the Gaussian mechanism on z is implemented for --representation hidden-mean only")
    try:
        return ZMechanism.from_policy(policy)
    except PrivacyConfigError as exc:
        import re

        raise CliError(re.sub(r"'(z-[a-z-]+)'", r"--\1", str(exc).replace("node config ", ""))) from None


def cmd_keygen(args: argparse.Namespace) -> None:
    from common.signing import generate_keypair

    priv, pub = generate_keypair(args.out, args.site)
    print(f"private key {priv} (keep it at the site)\npublic key  {pub} (give it to the coordinator)")


# ---------------------------------------------------------------------------------------------
# coordinator: composition
# ---------------------------------------------------------------------------------------------


def cmd_compose(args: argparse.Namespace) -> None:
    from server.composer import compose_for_target

    z = _load_z(args.embedding)
    params: dict[str, float] = {}
    if args.lam1 is not None:
        params["lam1"] = args.lam1
    if args.lam2 is not None:
        params["lam2"] = args.lam2
    if args.max_l1 is not None:
        if args.strategy not in ("lin", "lin-l1"):
            raise ValueError(f"--max-l1 bounds the weights of lin and lin-l1, not {args.strategy!r}")
        params["max_l1"] = args.max_l1
    reg = _open_registry(args)
    try:
        res = compose_for_target(
            reg, z, strategy=args.strategy, k=args.k, exclude_site=args.exclude_site, task=args.task,
            max_rank=args.max_rank, strategy_params=params or None, out_dir=args.out, target=args.target,
        )
    finally:
        reg.close()
    rows = [{"id": i, "distance": float(d), "weight": float(w)}
            for i, d, w in zip(res.ids, res.distances, res.weights)]
    if args.json:
        print(json.dumps({"strategy": args.strategy, "retrieved": rows, "out": str(res.out_dir),
                          "output_sha256": res.output_sha256}, indent=2))
        return
    _print_table(rows, ["id", "distance", "weight"])
    print(f"composed adapter written to {res.out_dir} (sha256 {res.output_sha256[:16]}…)")


# ---------------------------------------------------------------------------------------------
# audit
# ---------------------------------------------------------------------------------------------


def cmd_audit_verify(args: argparse.Namespace) -> None:
    from server.audit import problems_as_dicts, verify
    from server.registry.binding import check_binding

    anchor = _parse_anchor(args.anchor) if args.anchor else None
    problems = verify(args.log, anchor=anchor)
    reg_dir = Path(args.registry) if args.registry else Path(args.log).parent
    records = reg_dir / "records.jsonl"
    binding = check_binding(records, args.log) if records.is_file() else []
    if args.json:
        print(json.dumps({"ok": not problems and not binding, "problems": problems_as_dicts(problems),
                          "records": binding}, indent=2))
    elif not problems and not binding:
        what = f" and every record of {records} bound to it" if records.is_file() else ""
        print(f"{args.log}: OK, hash chain intact{what}" + (f", anchor seq {anchor['seq']} found" if anchor else ""))
    else:
        for p in problems:
            print(f"{args.log}: {p}")
        for b in binding:
            print(f"{records}: {b}")
    if problems or binding:
        sys.exit(1)


def _parse_anchor(text: str) -> dict[str, Any]:
    """``SEQ:HASH`` or a JSON file holding ``{"seq", "line_sha256"}`` (what ``head`` or a receipt gives)."""
    from common.safeio import loads_json, read_regular_file

    if ":" in text and not Path(text).exists():
        seq, _, digest = text.partition(":")
        data: Any = {"seq": seq, "line_sha256": digest}
    else:
        data = loads_json(read_regular_file(text, 1 << 20, what="anchor file"), f"anchor file {text}")
        if isinstance(data, dict) and isinstance(data.get("body"), dict):
            data = data["body"]  # a receipt statement
    try:
        seq, digest = int(data["seq"]), str(data["line_sha256"]).lower()
    except (KeyError, TypeError, ValueError):
        raise ValueError(f"--anchor {text!r}: expected SEQ:SHA256 or a JSON file with seq and line_sha256") from None
    if seq < 0 or len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
        raise ValueError(f"--anchor {text!r}: seq must be >= 0 and the hash 64 hex digits")
    return {"seq": seq, "line_sha256": digest}


def cmd_audit_report(args: argparse.Namespace) -> None:
    from server.audit import format_report, report

    rep = report(args.log)
    print(json.dumps(rep, indent=2) if args.json else format_report(rep))


def cmd_audit_cross_check(args: argparse.Namespace) -> None:
    from server.crosscheck import cross_check

    result = cross_check(args.egress, args.audit, args.site, coordinator_key=args.coordinator_key)
    print(result.format() if hasattr(result, "format") else result)
    if not getattr(result, "ok", True):
        sys.exit(1)


# ---------------------------------------------------------------------------------------------
# recipes
# ---------------------------------------------------------------------------------------------


def cmd_experiment(args: argparse.Namespace) -> None:
    from server.experiment import main as experiment_main

    experiment_main(profile=args.profile, out_dir=args.out, groups=args.groups)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="rpe",
        description="Retrieval-based parameter ensembles: store site LoRAs with their data embeddings, "
                    "and compose the nearest ones for a new site without training.",
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    reg = sub.add_parser("registry", help="create, fill and inspect a LoRA registry",
                         description="The coordinator's LoRA registry (records + blobs + Chroma index).")
    rsub = reg.add_subparsers(dest="registry_command", required=True, metavar="ACTION")
    r = rsub.add_parser("init", help="create a registry bound to one base model",
                        description="Create a registry for adapters of BASE (its fingerprint and module "
                                    "shapes are recorded so submissions can be validated without the model).")
    r.add_argument("--registry", required=True, help="registry directory to create")
    r.add_argument("--base", default="smollm2-135m-instruct",
                   help="base model: a local model directory or 'smollm2-135m-instruct' (default)")
    r.add_argument("--representation", choices=["hidden-mean", "minilm"], default="hidden-mean",
                   help="what z is: the base model's mean hidden state (default) or MiniLM sentence embeddings")
    r.add_argument("--layer", type=int, default=-1, help="hidden layer for hidden-mean (default -1: last)")
    r.add_argument("--chroma-host", help="use a `chroma run` server at this host instead of embedded Chroma")
    r.add_argument("--chroma-port", type=int, help="port of the Chroma server")
    r.add_argument("--blob-key-file", help="encrypt every adapter blob at rest with this AES-256-GCM key file "
                   "(`rpe blob-key new FILE`; default: $RPE_BLOB_KEY_FILE, else $RPE_BLOB_KEY; none: plaintext "
                   "blobs). Fixed for the registry's life; z and metadata stay unencrypted")
    r.set_defaults(func=cmd_registry_init)

    r = rsub.add_parser("add", help="add a PEFT adapter directory with its embedding",
                        description="Validate and store one adapter. Rejected input changes nothing.")
    r.add_argument("--registry", required=True)
    r.add_argument("--adapter", required=True, help="PEFT adapter directory (adapter_config.json + safetensors)")
    r.add_argument("--embedding", required=True, help=".npy file with the site's mean embedding z")
    r.add_argument("--site", required=True)
    r.add_argument("--task", required=True)
    r.add_argument("--modality", default="text")
    r.add_argument("--samples", type=int, required=True, help="number of training examples")
    r.add_argument("--base-fingerprint", help="defaults to the registry's (first) base")
    r.add_argument("--json", action="store_true")
    r.add_argument("--blob-key-file", help=_BLOB_KEY_HELP)
    r.set_defaults(func=cmd_registry_add)

    r = rsub.add_parser("ls", help="list records", description="List live records, optionally filtered.")
    r.add_argument("--registry", required=True)
    r.add_argument("--task")
    r.add_argument("--modality")
    r.add_argument("--site")
    r.add_argument("--json", action="store_true")
    r.add_argument("--blob-key-file", help=_BLOB_KEY_HELP)
    r.set_defaults(func=cmd_registry_ls)

    r = rsub.add_parser("show", help="show one record", description="Print one record as JSON.")
    r.add_argument("--registry", required=True)
    r.add_argument("id")
    r.add_argument("--z", action="store_true", help="include the embedding vector")
    r.add_argument("--blob-key-file", help=_BLOB_KEY_HELP)
    r.set_defaults(func=cmd_registry_show)

    r = rsub.add_parser("rm", help="remove a record", description="Tombstone a record (its blob is kept).")
    r.add_argument("--registry", required=True)
    r.add_argument("id")
    r.add_argument("--reason", help="recorded in the audit log")
    r.add_argument("--blob-key-file", help=_BLOB_KEY_HELP)
    r.set_defaults(func=cmd_registry_rm)

    b = sub.add_parser("blob-key", help="create the key that encrypts a registry's adapter blobs at rest",
                       description="AES-256-GCM encryption of adapter blobs at rest (optional). Create a key "
                                   "file, then `rpe registry init --blob-key-file FILE`; every later command "
                                   "that stores or reads adapters needs --blob-key-file FILE or "
                                   "$RPE_BLOB_KEY_FILE (or the key itself in $RPE_BLOB_KEY). z, metadata and "
                                   "the audit log are not encrypted; there is no key rotation.")
    bsub = b.add_subparsers(dest="blob_key_command", required=True, metavar="ACTION")
    r = bsub.add_parser("new", help="write a fresh random key (64 hex digits, mode 0600) and print its id",
                        description="Write 32 random bytes as 64 hex digits to FILE with mode 0600. Refuses to "
                                    "overwrite FILE. Keep a backup: an encrypted registry is unreadable without it.")
    r.add_argument("file", metavar="FILE", help="key file to create")
    r.set_defaults(func=cmd_blob_key_new)

    e = sub.add_parser("embed", help="compute a dataset's mean embedding z (site side)",
                       description="Mean of a hidden layer of the frozen base model over all non-padding "
                                   "tokens of a dataset (JSONL with 'prompt' fields; labels are not needed).")
    e.add_argument("--data", required=True, help="JSONL dataset file")
    e.add_argument("--out", required=True, help="where to write z (.npy)")
    e.add_argument("--model", default="smollm2-135m-instruct", help="base model directory or name")
    e.add_argument("--representation", choices=["hidden-mean", "minilm"], default="hidden-mean")
    e.add_argument("--layer", type=int, default=-1)
    e.add_argument("--max-length", type=int, default=256, help="tokens per example (longer are truncated)")
    e.add_argument("--quiet", action="store_true", help="no progress bar")
    e.add_argument("--json", action="store_true")
    e.add_argument("--z-clip", type=float, help="Gaussian mechanism: L2 bound on each report's token sum "
                   "(`rpe privacy z-norms` helps choose it); needs --z-epsilon or --z-noise-multiplier")
    e.add_argument("--z-epsilon", type=float, help="target ε of this z (σ is calibrated)")
    e.add_argument("--z-noise-multiplier", type=float, help="noise std / z-clip (instead of --z-epsilon)")
    e.add_argument("--z-delta", type=float, help="δ (default 1e-5)")
    e.set_defaults(func=cmd_embed)

    c = sub.add_parser("compose", help="retrieve, weigh and compose adapters for a target embedding",
                       description="θ = θ0 + Σ w_i δθ_i over the k nearest adapters; writes a PEFT adapter dir.")
    c.add_argument("--registry", required=True)
    c.add_argument("--embedding", required=True, help=".npy with the target's mean embedding")
    c.add_argument("--strategy", choices=["sim", "lin", "lin-l1", "avg", "nearest"], default="sim")
    c.add_argument("--k", type=int, default=4, help="number of adapters to retrieve (default 4)")
    c.add_argument("--exclude-site", help="leave this site's own adapters out (leave-one-out)")
    c.add_argument("--task", help="only retrieve adapters of this task")
    c.add_argument("--max-rank", type=int, help="re-compress to the best rank-R approximation")
    c.add_argument("--lam1", type=float, help="sim temperature (default: median squared distance)")
    c.add_argument("--max-l1", type=float, help="lin / lin-l1: bound on ‖w‖₁, how far the weights may cancel "
                                               "(default 3; inf = unbounded)")
    c.add_argument("--lam2", type=float, help="lin-l1 L1 strength (default: relative to the distances)")
    c.add_argument("--target", default="cli", help="name recorded in the audit log")
    c.add_argument("--out", required=True, help="output PEFT adapter directory")
    c.add_argument("--json", action="store_true")
    c.add_argument("--blob-key-file", help=_BLOB_KEY_HELP)
    c.set_defaults(func=cmd_compose)

    k = sub.add_parser("keygen", help="create a site's Ed25519 signing key pair",
                       description="Writes SITE.key (private, mode 0600) and SITE.pub into --out.")
    k.add_argument("--site", required=True)
    k.add_argument("--out", required=True, help="directory for the key files")
    k.set_defaults(func=cmd_keygen)

    a = sub.add_parser("audit", help="verify and summarise audit logs",
                       description="Offline checks an auditor can run without trusting the coordinator.")
    asub = a.add_subparsers(dest="audit_command", required=True, metavar="ACTION")
    v = asub.add_parser("verify", help="check the hash chain; exit 1 and say where if broken")
    v.add_argument("--log", required=True, help="the coordinator's audit.jsonl")
    v.add_argument("--registry", help="registry directory whose records.jsonl is checked against the log "
                                      "(default: the log's directory, when it holds records.jsonl)")
    v.add_argument("--anchor", help="a known head, SEQ:LINE_SHA256 or a JSON file (audit head, or a receipt): "
                                    "also detects a truncated or rewritten tail")
    v.add_argument("--json", action="store_true")
    v.set_defaults(func=cmd_audit_verify)
    v = asub.add_parser("report", help="what was received per site and used per composition")
    v.add_argument("--log", required=True)
    v.add_argument("--json", action="store_true")
    v.set_defaults(func=cmd_audit_report)
    v = asub.add_parser("cross-check", help="match a site's egress log against the coordinator's audit log")
    v.add_argument("--egress", required=True, help="the site's egress.jsonl")
    v.add_argument("--audit", required=True, help="the coordinator's audit.jsonl")
    v.add_argument("--site", required=True, help="the site id the coordinator knows it by")
    v.add_argument("--coordinator-key", help="the coordinator's public key (PEM) the site holds, to check the "
                                             "receipts in its egress log (default: keys/coordinator.pub next to "
                                             "the audit log)")
    v.set_defaults(func=cmd_audit_cross_check)

    x = sub.add_parser("experiment", help="library-level leave-one-group-out experiment on real data",
                       description="Train a LoRA per report group on SmolLM2-135M, then for each group "
                                   "compose the others with every strategy and score ROUGE-L.")
    x.add_argument("--profile", choices=["quick", "full"], default="quick",
                   help="quick: 2-core CPU budget (default); full: more data and steps (GPU)")
    x.add_argument("--out", default="runs/experiment", help="output directory")
    x.add_argument("--groups", nargs="*", help="report groups (default: the four largest distinct ones)")
    x.set_defaults(func=cmd_experiment)

    from common.privacy_cli import add_commands as add_privacy_commands

    add_privacy_commands(sub)
    return p


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``rpe`` console script."""
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except CliError as exc:
        print(f"rpe: error: {exc}", file=sys.stderr)
        sys.exit(2)
    except (ValueError, LookupError, OSError) as exc:  # typed library errors carry their own advice
        print(f"rpe: error: {type(exc).__name__}: {exc}", file=sys.stderr)
        sys.exit(2)
    except Exception as exc:
        from server.registry import RegistryError

        if isinstance(exc, RegistryError):
            print(f"rpe: error: {type(exc).__name__}: {exc}", file=sys.stderr)
            sys.exit(2)
        raise


if __name__ == "__main__":
    main()
