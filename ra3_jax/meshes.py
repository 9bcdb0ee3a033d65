"""Named meshes: ``launch/meshes/<name>.yaml`` files, validated against the devices a run sees at start-up.

A mesh file::

    description: one TPU v5e-8 VM (8 chips, one host)
    platform: tpu          # tpu | gpu | cpu (checked against jax.default_backend())
    devices: 8             # total devices of the run (all processes)
    processes: 1           # hosts / processes (informational; launch scripts use it)
    data: 1
    fsdp: 8
    tensor: 1
    dcn_data: 1            # data-parallel replicas across slices / nodes (hybrid mesh)

``mesh.name`` in a config (or ``--mesh`` on the command line) selects one by name or path.
"""

from __future__ import annotations

import dataclasses
import math
import os
from pathlib import Path

import yaml

from ra3_jax.errors import RA3Error

ENV_MESH_DIR = "RA3_MESH_DIR"
MESH_KEYS = ("description", "platform", "devices", "processes", "data", "fsdp", "tensor", "dcn_data")


class MeshConfigError(RA3Error, ValueError):
    pass


def mesh_dirs() -> list[Path]:
    dirs = []
    if os.environ.get(ENV_MESH_DIR):
        dirs.append(Path(os.environ[ENV_MESH_DIR]))
    dirs.append(Path(__file__).resolve().parent.parent / "launch" / "meshes")
    return dirs


def available_meshes() -> list[str]:
    return sorted({p.stem for d in mesh_dirs() if d.is_dir() for p in d.glob("*.yaml")})


def find_mesh_file(name: str) -> Path:
    p = Path(os.path.expanduser(name))
    if p.suffix in (".yaml", ".yml") or os.sep in name:
        if not p.is_file():
            raise MeshConfigError(f"mesh file not found: {p}")
        return p
    for d in mesh_dirs():
        f = d / f"{name}.yaml"
        if f.is_file():
            return f
    raise MeshConfigError(
        f"unknown mesh {name!r}; named meshes: {', '.join(available_meshes()) or 'none'} "
        f"(searched {', '.join(str(d) for d in mesh_dirs())}; ${ENV_MESH_DIR} adds a folder)"
    )


def load_mesh_file(name: str) -> dict:
    path = find_mesh_file(name)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise MeshConfigError(f"mesh file {path} is not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise MeshConfigError(f"mesh file {path}: expected a mapping of {', '.join(MESH_KEYS)}")
    unknown = set(raw) - set(MESH_KEYS)
    if unknown:
        raise MeshConfigError(f"mesh file {path}: unknown keys {sorted(unknown)}; valid keys: {', '.join(MESH_KEYS)}")
    for key in ("devices", "data", "fsdp", "tensor"):
        if not isinstance(raw.get(key), int) or raw[key] < 1:
            raise MeshConfigError(f"mesh file {path}: '{key}' must be a positive integer, got {raw.get(key)!r}")
    raw.setdefault("dcn_data", 1)
    raw.setdefault("processes", 1)
    raw.setdefault("platform", "")
    if math.prod(raw[k] for k in ("data", "fsdp", "tensor")) != raw["devices"]:
        raise MeshConfigError(
            f"mesh file {path}: data x fsdp x tensor = {raw['data'] * raw['fsdp'] * raw['tensor']} but devices = {raw['devices']}"
        )
    if raw["data"] % raw["dcn_data"]:
        raise MeshConfigError(f"mesh file {path}: dcn_data={raw['dcn_data']} must divide data={raw['data']}")
    raw["path"] = str(path)
    raw["name"] = path.stem
    return raw


def resolve_mesh_section(section):
    """The mesh config section with a named mesh's sizes filled in (unchanged when ``name`` is empty)."""
    if not section.name:
        return section
    m = load_mesh_file(section.name)
    return dataclasses.replace(section, data=m["data"], fsdp=m["fsdp"], tensor=m["tensor"], dcn_data=m["dcn_data"])


def check_devices(mesh_file: dict, n_devices: int, platform: str) -> None:
    want_platform = mesh_file.get("platform") or platform
    if mesh_file["devices"] != n_devices or want_platform != platform:
        dcn = f", dcn_data={mesh_file['dcn_data']}" if mesh_file["dcn_data"] > 1 else ""
        raise MeshConfigError(
            f"mesh '{mesh_file['name']}' ({mesh_file['path']}) is for {mesh_file['devices']} {want_platform} devices "
            f"(data={mesh_file['data']} fsdp={mesh_file['fsdp']} tensor={mesh_file['tensor']}"
            f"{dcn}), but this run sees "
            f"{n_devices} {platform} devices. Pick a mesh for this machine ({', '.join(available_meshes())}) or set "
            "mesh.name='' and mesh.data/fsdp/tensor."
        )


def make_run_mesh(section, devices=None, *, check_platform: bool = True):
    """The run's mesh from the config's mesh section; a named mesh is checked against the visible devices
    (``check_platform=False``: count only, e.g. a GPU mesh simulated on CPU devices)."""
    import jax

    from ra3_jax.sharding import make_mesh

    devices = list(jax.devices() if devices is None else devices)
    if section.name:
        m = load_mesh_file(section.name)
        check_devices(m, len(devices), devices[0].platform if check_platform else m.get("platform") or devices[0].platform)
    s = resolve_mesh_section(section)
    return make_mesh(s.data, s.fsdp, s.tensor, devices, dcn_data=s.dcn_data)
