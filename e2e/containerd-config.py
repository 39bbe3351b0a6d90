#!/usr/bin/env python3
"""Turns `containerd config default` (stdin) into the configuration of one e2e node's
containerd (stdout): its root, state, sockets, runc root and CNI files under the node's
directory (argv[1]), the node's pause image (argv[2]) as the sandbox image, and
restrict_oom_score_adj, because this sandbox refuses negative oom_score_adj values
(runc then fails with "can't get final child's PID from pipe")."""
import re
import sys

node_dir, pause_image = sys.argv[1], sys.argv[2]
config = sys.stdin.read()


def set_key(text, section, key, value):
    """Sets `key = value` inside [section] (the first occurrence after its header)."""
    header = f"[{section}]"
    start = text.index(header)
    pattern = re.compile(rf"(^\s*{re.escape(key)} = ).*$", re.M)
    match = pattern.search(text, start)
    if match is None:
        raise SystemExit(f"containerd-config.py: no {key} in [{section}]")
    return text[: match.start()] + match.group(1) + value + text[match.end():]


ctrd = f"{node_dir}/containerd"
config = config.replace('root = "/var/lib/containerd"', f'root = "{ctrd}/root"', 1)
config = config.replace('state = "/run/containerd"', f'state = "{ctrd}/state"', 1)
config = set_key(config, "grpc", "address", f'"{ctrd}/containerd.sock"')
config = set_key(config, "ttrpc", "address", f'"{ctrd}/containerd-ttrpc.sock"')
config = set_key(config, 'plugins."io.containerd.grpc.v1.cri"', "sandbox_image", f'"{pause_image}"')
config = set_key(config, 'plugins."io.containerd.grpc.v1.cri"', "restrict_oom_score_adj", "true")
config = set_key(config, 'plugins."io.containerd.grpc.v1.cri".cni', "bin_dir", '"/usr/lib/cni"')
config = set_key(config, 'plugins."io.containerd.grpc.v1.cri".cni', "conf_dir", f'"{node_dir}/cni/net.d"')
config = set_key(config, 'plugins."io.containerd.internal.v1.opt"', "path", f'"{ctrd}/opt"')
config = set_key(
    config,
    'plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options',
    "Root",
    f'"{ctrd}/runc"',
)
sys.stdout.write(config)
