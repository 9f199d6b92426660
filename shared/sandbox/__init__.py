"""Sandbox confinement, shared by the worker (the agent's tools) and the API.

- `confinement`: what this host can do (bubblewrap, cgroups, quota, private
  networks, seccomp), detected once, and how a confined process is started;
- `handle`: `OpenSandbox`, a sandbox as one turn uses it;
- `fileservice` (runs inside the sandbox) and `files` (its client): file access
  with the sandbox's own identity;
- `process`, `cgroups`, `quota`, `network`, `seccomp`, `workspace`: the parts.
"""
