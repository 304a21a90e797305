"""Run a suite: every direction over every scene, then one score per direction.

``run_suite`` generates with a ``Generator`` (any way it was loaded); ``run_baseline`` scores a
trivial baseline (``eval/baselines.py``) over the same directions without a model. Both return
``SuiteResults``, which ``eval/report.py`` writes. A direction skips the scenes that lack its
source or target (a scene with no visible object has no grounding).

Seeds: scene ``i`` of a direction is generated with ``derive_seed("eval", settings.seed, i)``,
so scenes get different noise and every run of the same command is identical.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from tqdm import tqdm

from modus_mega.eval.baselines import baseline
from modus_mega.eval.directions import Direction, check_supported, grid
from modus_mega.eval.scoring import SCORERS, Context
from modus_mega.eval.suites import EvalScene, SuiteInfo
from modus_mega.inference.verification import GroundingVerifier, LikelihoodVerifier, Verifier, best_of_n
from modus_mega.inference.generator import Generator, Settings
from modus_mega.modalities import modality_names
from modus_mega.modalities.values import Payload
from modus_mega.seeding import derive_seed
from modus_mega.tokenizers import ModalityTokenizers


@dataclass
class DirectionResult:
    """The scores of one direction."""

    direction: str  # "rgb:depth"
    source: str
    target: str
    headline: str  # the metric shown in tables
    value: float  # scores[headline] (nan when the metric is undefined on these scenes)
    full_scale: float  # the headline's best value
    scores: dict[str, float]
    num_scenes: int


@dataclass
class SuiteResults:
    """Everything ``results.json`` holds."""

    suite: str
    model: str  # checkpoint path, or "baseline:<name>"
    num_scenes: int
    settings: dict[str, Any]
    directions: list[DirectionResult] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict; nan becomes None."""
        def clean(x: Any) -> Any:
            if isinstance(x, float) and math.isnan(x):
                return None
            if isinstance(x, dict):
                return {k: clean(v) for k, v in x.items()}
            if isinstance(x, list):
                return [clean(v) for v in x]
            return x
        return clean(dataclasses.asdict(self))


ANY_SOURCE = "*"  # a baseline's source: it reads no condition

Predict = Callable[[Direction, int, EvalScene], Payload]  # (direction, scene index, scene) -> decoded prediction


def available_modalities(scenes: Sequence[EvalScene]) -> list[str]:
    """Modalities that at least one scene can give as a condition (and score as a target)."""
    return sorted({name for scene in scenes for name in scene.sample.available()})


def resolve_directions(directions: Sequence[Direction] | None, scenes: Sequence[EvalScene]) -> list[Direction]:
    """The requested directions, checked against the scenes; None: the whole grid."""
    available = available_modalities(scenes)
    if directions is None:
        return grid(available)
    check_supported(directions, available)
    return list(directions)


def _has(scene: EvalScene, direction: Direction) -> bool:
    """Whether ``scene`` can give ``direction``'s conditions and score its target."""
    conditions = [n for n in direction.steps[:-1] if n != ANY_SOURCE]
    return all(n in scene.sample.available() for n in conditions) and direction.target in scene.truth


def _run(
    predict: Predict, scenes: Sequence[EvalScene], info: SuiteInfo, tokenizers: ModalityTokenizers | None,
    directions: Sequence[Direction], results: SuiteResults, progress: bool,
) -> SuiteResults:  # fmt: skip
    ctx = Context(info, tokenizers)
    with tqdm(total=len(directions) * len(scenes), desc=f"eval {results.suite}", unit="gen", disable=not progress) as bar:
        for direction in directions:
            scorer = SCORERS[direction.target]
            used = [(i, s) for i, s in enumerate(scenes) if _has(s, direction)]
            preds = []
            for i, scene in used:
                preds.append(predict(direction, i, scene))
                bar.update(1)
            bar.update(len(scenes) - len(used))
            scores = scorer.score(direction.target, preds, [s for _, s in used], ctx) if used else {}
            results.directions.append(
                DirectionResult(
                    str(direction), direction.source, direction.target, scorer.headline,
                    float(scores.get(scorer.headline, math.nan)), scorer.full_scale,
                    {k: float(v) for k, v in scores.items()}, len(used),
                )  # fmt: skip
            )
    return results


def run_suite(
    generator: Generator, tokenizers: ModalityTokenizers, scenes: Sequence[EvalScene], info: SuiteInfo,
    directions: Sequence[Direction] | None = None, settings: Settings | None = None, suite: str = "synth",
    model: str = "", progress: bool = True, candidates: int = 1, verifier: str = "likelihood",
) -> SuiteResults:  # fmt: skip
    """Generate every direction's target for every scene with ``generator`` and score it.

    ``candidates`` > 1: each target is the best of that many under ``verifier`` (``likelihood`` or
    ``grounding``, prompted with the scene's caption: ``inference/verification.py``).
    """
    settings = settings or Settings()
    settings = dataclasses.replace(settings, image_size=info.image_size, feature_grid=info.feature_grid)
    chosen = resolve_directions(directions, scenes)
    ctx = Context(info, tokenizers)

    def predict(direction: Direction, index: int, scene: EvalScene) -> Payload:
        per_scene = dataclasses.replace(
            settings, seed=derive_seed("eval", settings.seed, index), chain=settings.chain or len(direction.steps) > 2
        )
        expressions = {"grounding": scene.expression}
        if candidates > 1:
            if len(direction.steps) != 2:
                raise ValueError(f"best-of-N picks direct SOURCE:TARGET generations; {direction} is chained")
            judge = _verifier(verifier, scene, tokenizers)
            verified = best_of_n(generator, scene.sample, [direction.source], direction.target, per_scene, candidates,
                                 judge, expressions)  # fmt: skip
            return SCORERS[direction.target].decode(verified.generation.targets[-1], scene, ctx)
        out = generator.generate(scene.sample, [direction.source], list(direction.steps[1:]), per_scene, expressions).targets[-1]
        return SCORERS[direction.target].decode(out, scene, ctx)

    record = {k: v for k, v in dataclasses.asdict(settings).items() if k in ("steps", "shift", "solver", "seed", "chain")}
    if candidates > 1:
        record |= {"best_of": candidates, "verifier": verifier}
    record["condition_mode_2d"] = generator.data.condition_mode_2d
    results = SuiteResults(suite, model, len(scenes), record)
    return _run(predict, scenes, info, tokenizers, chosen, results, progress)


def _verifier(name: str, scene: EvalScene, tokenizers: ModalityTokenizers) -> Verifier:
    """The best-of-N verifier ``name`` prompted with ``scene``'s caption."""
    caption = scene.sample.tokens.get("caption")
    if not caption:
        raise ValueError(f"best-of-N verification needs the scene's caption; {scene.key} has none")
    if name == "likelihood":
        return LikelihoodVerifier(caption)
    if name == "grounding":
        return GroundingVerifier(tokenizers.text.decode(caption), tokenizers.text)
    raise ValueError(f"unknown verifier {name!r}; choose likelihood or grounding")


def run_baseline(
    name: str, scenes: Sequence[EvalScene], info: SuiteInfo,
    directions: Sequence[Direction] | None = None, suite: str = "synth", progress: bool = True,
) -> SuiteResults:  # fmt: skip
    """Score baseline ``name`` once per target (of ``directions``, else of the scenes' truth) it covers: source ``*``."""
    predictors = baseline(name)
    truths = {n for s in scenes for n in s.truth}
    targets = truths if directions is None else {d.target for d in directions} & truths
    chosen = [Direction((ANY_SOURCE, t)) for t in sorted(targets, key=modality_names().index) if t in predictors]
    cache: dict[str, list[Payload]] = {}

    def predict(direction: Direction, index: int, scene: EvalScene) -> Payload:
        if direction.target not in cache:
            cache[direction.target] = predictors[direction.target](direction.target, scenes, Context(info, None))
        return cache[direction.target][index]

    results = SuiteResults(suite, f"baseline:{name}", len(scenes), {"baseline": name})
    return _run(predict, scenes, info, None, chosen, results, progress)
