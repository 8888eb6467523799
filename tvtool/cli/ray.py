"""`--ray [ADDRESS]`: hand an α sweep to a pool of engines on a Ray cluster (tvtool.evaluation.cluster)."""

from __future__ import annotations

from dataclasses import replace

import click

from tvtool.evaluation.units import RayOptions
from tvtool.options import from_cli

RAY = click.option("--ray", "ray", is_flag=False, flag_value="local", default=None, metavar="[ADDRESS]",
                    help="Spread the α sweep over a pool of engines on a Ray cluster: no value = a local cluster, "
                         "or auto, host:port, ray://host:port.")


def ray_options(kw: dict) -> RayOptions | None:
    address = kw.pop("ray")
    opts = from_cli(RayOptions, kw)
    return None if address is None else replace(opts, address=address)
