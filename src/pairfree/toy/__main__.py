"""`python -m pairfree.toy [--preset demo] [--seed 0] [--cache DIR] [--media DIR]`: build or load a world,
print its realism table, and optionally write it as media files (`pairfree.toy.media`)."""

from __future__ import annotations

import argparse

from pairfree.fileio import user_cache_dir
from pairfree.toy.config import PRESETS, ToyWorldConfig
from pairfree.toy.world import ToyWorld, make_world


def realism_table(world: ToyWorld) -> str:
    """Markdown table of the per-space statistics, then the overlap map fits."""
    rows = [
        "| space | matched cos | random cos | centroid cos dist | R@1 a->b | R@1 b->a | concept R@1 a->b | temperature |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for s, st in world.info["realism"]["spaces"].items():
        a, b = st["modalities"]
        rows.append(
            f"| {s} ({a}->{b}) | {st['matched_cosine']:.3f} | {st['random_pair_cosine']:.3f} | "
            f"{st['centroid_cosine_distance']:.3f} | {st['r1_a_to_b']:.3f} | {st['r1_b_to_a']:.3f} | "
            f"{st['concept_r1_a_to_b']:.3f} | {st['temperature']:.4f} |"
        )
    rows += ["", "| overlap | Procrustes residual | linear R^2 | Procrustes R@1 |", "| --- | --- | --- | --- |"]
    for name, fit in world.info["realism"]["overlap"].items():
        rows.append(
            f"| {name} | {fit['procrustes_residual']:.3f} | {fit['linear_r2']:.3f} | {fit['procrustes_r1']:.3f} |"
        )
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m pairfree.toy", description=__doc__)
    ap.add_argument("--preset", default="demo", choices=sorted(PRESETS))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cache", default=str(user_cache_dir("toy")), help="cache folder ('' for none)")
    ap.add_argument("--media", help="also write the world's memories and test items as media files here")
    ap.add_argument("--points-format", choices=["npy", "ply"], default="npy")
    args = ap.parse_args(argv)
    world = make_world(ToyWorldConfig(seed=args.seed, preset=args.preset), cache_dir=args.cache or None)
    print(f"built in {world.info['build_seconds']['total']:.1f} s; sizes {world.info['sizes']}")
    print(realism_table(world))
    if args.media:
        from pairfree.toy.media import write_media

        out = write_media(world, args.media, points_format=args.points_format)
        print(f"wrote {out}: encoders toy:{out}/clip, toy:{out}/clap, toy:{out}/ulip")


if __name__ == "__main__":
    main()
