"""Turning an upgrade request into a plan, or refusing it before anything moves.

Everything here only reads: releases on disk and Status of each sandbox.
A refusal raises the KeelError the operator should see:

- InvalidArgument: bad components, batch size, pause, version syntax, id;
- NotFound: the target release is not installed; a named sandbox does
  not exist on this node;
- FailedPrecondition: a named sandbox does not answer; versions that do
  not interoperate (``upgrade.releases.incompatibility``); a VM whose guest
  image lacks what the release's agent needs (the shim's
  CheckAgentRelease); a sandbox whose
  state schema is newer than the target release reads; a from-version
  whose release is missing (a rollback would be impossible).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from keel.errors import FailedPrecondition, InvalidArgument, NotFound
from opsd._discovery import SandboxView, Shims, check_id, scan
from opsd.state import COMPONENTS, Plan, PlanState, make_plan
from upgrade.releases import Release, ReleaseStore, check_version, incompatibility


@dataclass(frozen=True, slots=True)
class UpgradeRequest:
    to_version: str
    components: tuple[str, ...] = COMPONENTS
    batch_size: int = 1
    pause_s: float = 0.0
    sandbox_ids: tuple[str, ...] = ()
    dry_run: bool = False

    def validated(self) -> UpgradeRequest:
        comps = self.components or COMPONENTS
        bad = [c for c in comps if c not in COMPONENTS]
        if bad:
            raise InvalidArgument(f"unknown component {bad[0]!r} (components: shim, agent)")
        if self.batch_size < 1:
            raise InvalidArgument("batch size must be at least 1")
        if not math.isfinite(self.pause_s) or self.pause_s < 0 or self.pause_s > 86400:
            raise InvalidArgument("pause must be between 0 and 86400 seconds")
        check_version(self.to_version)
        ids = tuple(dict.fromkeys(check_id(s) for s in self.sandbox_ids))
        return UpgradeRequest(self.to_version, tuple(c for c in COMPONENTS if c in comps),
                              self.batch_size, self.pause_s, ids, self.dry_run)


async def build_plan(req: UpgradeRequest, plan_id: str, shims: Shims,
                     releases: ReleaseStore) -> tuple[Plan, list[str]]:
    """A plan for *req* (validated) plus notes for the operator; raises to refuse."""
    release = releases.get(req.to_version)
    for comp in req.components:
        entry = release.shim_path if comp == "shim" else release.agent_path
        if not entry.exists():
            raise FailedPrecondition(f"release {release.version} has no {entry}: reinstall it")
    ids = list(req.sandbox_ids) or shims.ids()
    if req.sandbox_ids:
        known = set(shims.ids())
        unknown = [s for s in ids if s not in known]
        if unknown:
            raise NotFound(f"no sandbox {', '.join(unknown)} on this node (opsctl ls lists them)")
    views, dead = await scan(shims, ids)
    if req.sandbox_ids and dead:
        raise FailedPrecondition("; ".join(f"sandbox {d.id} does not answer: {d.reason}"
                                           for d in dead))
    notes = [f"skipped {d.id}: does not answer ({d.reason})" for d in dead]
    chosen, problems = [], []
    for v in views:
        if all(v.version_of(c) == req.to_version for c in req.components):
            notes.append(f"skipped {v.id}: already at {req.to_version}")
            continue
        problems += _problems(v, req, release, releases)
        if "agent" in req.components and v.agent_version != req.to_version:
            # A VM's image must have what the release's agent needs (Python,
            # deps), and what the release it runs now needs, for a rollback.
            if why := await shims.agent_release_problem(v.id, release.agent_path):
                problems.append(f"{v.id}: agent: {why}")
            back = next((r for r in releases.list() if r.version == v.agent_version), None)
            if back is not None and (why := await shims.agent_release_problem(
                    v.id, back.agent_path)):
                problems.append(f"{v.id}: agent: a rollback to {back.version} would fail: {why}")
        chosen.append((v.id, v.shim_version, v.agent_version))
    if problems:
        raise FailedPrecondition("upgrade refused, no sandbox touched:\n  " + "\n  ".join(problems))
    plan = make_plan(plan_id, req.to_version, req.components, req.batch_size, req.pause_s, chosen)
    if not chosen:
        plan = plan.moved(PlanState.SUCCEEDED,
                          f"nothing to upgrade: no sandbox below {req.to_version}")
    return plan, notes


def _problems(v: SandboxView, req: UpgradeRequest, release: Release,
              releases: ReleaseStore) -> list[str]:
    out = []
    for comp in req.components:
        why = incompatibility(v.version_of(comp), req.to_version)
        if why:
            out.append(f"{v.id}: {comp}: {why}")
    after = {c: req.to_version if c in req.components else v.version_of(c) for c in COMPONENTS}
    if after["shim"] != after["agent"] and (why := incompatibility(after["agent"], after["shim"])):
        out.append(f"{v.id}: shim {after['shim']} with agent {after['agent']} would not"
                   f" interoperate ({why}); upgrade both components")
    reads = release.manifest.shim_state_schema if release.manifest else None
    if reads is not None and v.state_schema > reads:
        out.append(f"{v.id}: incompatible state schema: the sandbox's state is schema"
                   f" {v.state_schema}, release {release.version} reads up to {reads}")
    for comp in req.components:
        origin = v.version_of(comp)
        if origin != req.to_version and not any(r.version == origin for r in releases.list()):
            out.append(f"{v.id}: {comp} runs {origin}, whose release is not installed under"
                       f" {releases.root}: a rollback would be impossible (install it first)")
    return out
