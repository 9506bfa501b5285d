#!/usr/bin/env python3
"""Renders the Parley Helm chart without helm and checks the result.

Implements the small part of Go templates and Helm functions the chart uses (if/else/range,
define/include, pipelines, parentheses, quote, default, toYaml, toJson, nindent, ...), renders
the chart with its default values and with a set of values that switches everything on, and
checks that every document is valid YAML with the fields Kubernetes requires, that the
ConfigMap's parley.toml is valid TOML with keys Parley knows, that probes name declared ports,
that selectors match pod labels, that PARLEY_* variables are ones Parley reads, and that each
mode is wired as it should be (split: signaling with --no-local-media, media nodes on the host
network dialing the Service's /media-node with the node secret from the Secret).

    python3 deploy/helm/check.py            # check
    python3 deploy/helm/check.py --show     # also print the rendered manifests

Needs PyYAML (pip install pyyaml). Use `helm lint` / `helm template` too where helm exists.
"""

import copy
import json
import re
import sys
import tomllib
from pathlib import Path

import yaml

CHART = Path(__file__).resolve().parent / "parley"
REPO = CHART.parents[2]

# Variables that are passed although this version of Parley does not read them yet.
PLANNED_ENV = {"RUST_LOG"}


class TemplateError(Exception):
    pass


# ---- parsing --------------------------------------------------------------------------------

ACTION = re.compile(r"\{\{(-\s)?(.*?)(\s-)?\}\}", re.S)


def lex(src):
    """Text and action tokens, with {{- and -}} whitespace trimming applied."""
    tokens = []
    pos = 0
    for m in ACTION.finditer(src):
        text = src[pos : m.start()]
        if m.group(1):
            text = text.rstrip()
        if tokens and tokens[-1][0] == "action" and tokens[-1][2]:
            text = text.lstrip()
        tokens.append(("text", text, False))
        tokens.append(("action", m.group(2).strip(), bool(m.group(3))))
        pos = m.end()
    text = src[pos:]
    if tokens and tokens[-1][2]:
        text = text.lstrip()
    tokens.append(("text", text, False))
    return tokens


def parse(tokens, i=0, stop=()):
    """Nodes until one of the `stop` keywords; returns (nodes, index, keyword)."""
    nodes = []
    while i < len(tokens):
        kind, body, _ = tokens[i]
        i += 1
        if kind == "text":
            if body:
                nodes.append(("text", body))
            continue
        if body.startswith("/*"):
            continue
        word = body.split(None, 1)[0] if body else ""
        if word in stop:
            return nodes, i, word
        if word in ("if", "range", "with"):
            expr = body[len(word) :].strip()
            then, i, kw = parse(tokens, i, ("end", "else"))
            other = []
            if kw == "else":
                rest = tokens[i - 1][1][len("else") :].strip()
                if rest.startswith("if "):
                    # else if: a nested if that shares this block's end.
                    inner, i, kw2 = parse(tokens, i, ("end", "else"))
                    nested_else = []
                    if kw2 == "else":
                        nested_else, i, _ = parse(tokens, i, ("end",))
                    other = [("if", rest[3:].strip(), inner, nested_else)]
                else:
                    other, i, _ = parse(tokens, i, ("end",))
            nodes.append((word, expr, then, other))
        elif word == "define":
            name = json.loads(body[len("define") :].strip())
            inner, i, _ = parse(tokens, i, ("end",))
            nodes.append(("define", name, inner))
        elif word in ("end", "else"):
            raise TemplateError(f"unexpected {{{{ {body} }}}}")
        else:
            nodes.append(("expr", body))
    if stop:
        raise TemplateError("missing {{ end }}")
    return nodes, i, None


EXPR_TOKEN = re.compile(r'\s*("(?:[^"\\]|\\.)*"|\(|\)|\||[^\s()|]+)')


def tokenize_expr(src):
    out, pos = [], 0
    src = src.strip()
    while pos < len(src):
        m = EXPR_TOKEN.match(src, pos)
        if not m:
            raise TemplateError(f"cannot parse {src!r}")
        out.append(m.group(1))
        pos = m.end()
    return out


def parse_pipeline(toks, i=0):
    """[[arg, ...], ...] commands separated by |; args are strings or nested pipelines."""
    commands, current = [], []
    while i < len(toks):
        t = toks[i]
        if t == ")":
            break
        if t == "(":
            sub, i = parse_pipeline(toks, i + 1)
            if i >= len(toks) or toks[i] != ")":
                raise TemplateError("missing )")
            current.append(("pipe", sub))
        elif t == "|":
            commands.append(current)
            current = []
        else:
            current.append(t)
        i += 1
    commands.append(current)
    return commands, i


# ---- evaluation -----------------------------------------------------------------------------


def truthy(v):
    return not (v is None or v is False or v == 0 or v == "" or v == [] or v == {})


def to_yaml(v):
    if v is None:
        return "null"
    return yaml.safe_dump(v, default_flow_style=False, sort_keys=True).rstrip("\n")


def go_str(v):
    if v is None:
        return ""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float, str)):
        return str(v)
    raise TemplateError(f"printing a {type(v).__name__} ({v!r}); use toYaml or toJson")


class Renderer:
    def __init__(self, root):
        self.root = root
        self.defines = {}

    def load_defines(self, src):
        nodes, _, _ = parse(lex(src))
        for node in nodes:
            if node[0] == "define":
                self.defines[node[1]] = node[2]

    def render(self, src):
        nodes, _, _ = parse(lex(src))
        return self.run(nodes, self.root)

    def run(self, nodes, dot):
        out = []
        for node in nodes:
            kind = node[0]
            if kind == "text":
                out.append(node[1])
            elif kind == "expr":
                out.append(go_str(self.eval(node[1], dot)))
            elif kind == "if":
                branch = node[2] if truthy(self.eval(node[1], dot)) else node[3]
                out.append(self.run(branch, dot))
            elif kind == "with":
                v = self.eval(node[1], dot)
                out.append(self.run(node[2], v) if truthy(v) else self.run(node[3], dot))
            elif kind == "range":
                v = self.eval(node[1], dot)
                items = list(v.values()) if isinstance(v, dict) else list(v or [])
                if items:
                    out.extend(self.run(node[2], item) for item in items)
                else:
                    out.append(self.run(node[3], dot))
            elif kind == "define":
                self.defines[node[1]] = node[2]
        return "".join(out)

    def eval(self, src, dot):
        commands, _ = parse_pipeline(tokenize_expr(src))
        return self.pipeline(commands, dot)

    def pipeline(self, commands, dot):
        value, piped = None, False
        for command in commands:
            value = self.command(command, dot, value if piped else _NONE)
            piped = True
        return value

    def term(self, t, dot):
        if isinstance(t, tuple):
            return self.pipeline(t[1], dot)
        if t.startswith('"'):
            return json.loads(t)
        if re.fullmatch(r"-?\d+", t):
            return int(t)
        if t in ("true", "false"):
            return t == "true"
        if t == "$":
            return self.root
        if t.startswith("."):
            v = dot
            for part in t.split(".")[1:]:
                if not part:
                    continue
                v = v.get(part) if isinstance(v, dict) else None
            return v
        raise TemplateError(f"unknown term {t!r}")

    def command(self, command, dot, piped):
        if not command:
            raise TemplateError("empty command")
        head = command[0]
        if isinstance(head, str) and head in FUNCS:
            args = [self.term(a, dot) for a in command[1:]]
            if piped is not _NONE:
                args.append(piped)
            if head == "include":
                return self.include(*args)
            return FUNCS[head](*args)
        if len(command) != 1 or piped is not _NONE:
            raise TemplateError(f"{command!r} is not a function")
        return self.term(head, dot)

    def include(self, name, dot):
        if name not in self.defines:
            raise TemplateError(f"no template {name!r}")
        return self.run(self.defines[name], dot)


_NONE = object()


def indent(n, s):
    return "\n".join((" " * n + line) if line else line for line in go_str(s).split("\n"))


def required(msg, v):
    if not truthy(v):
        raise TemplateError(msg)
    return v


def quote(*vs):
    return " ".join(json.dumps(go_str(v)) for v in vs)


FUNCS = {
    "include": None,
    "quote": quote,
    "default": lambda d, v=None: v if truthy(v) else d,
    "toYaml": to_yaml,
    "toJson": lambda v: json.dumps(v, separators=(",", ":")),
    "nindent": lambda n, s: "\n" + indent(n, s),
    "indent": indent,
    "eq": lambda a, b: a == b,
    "ne": lambda a, b: a != b,
    "not": lambda v: not truthy(v),
    "and": lambda *vs: next((v for v in vs if not truthy(v)), vs[-1]),
    "or": lambda *vs: next((v for v in vs if truthy(v)), vs[-1]),
    "join": lambda sep, vs: sep.join(go_str(v) for v in (vs or [])),
    "sub": lambda a, b: int(a) - int(b),
    "printf": lambda fmt, *args: fmt % tuple(args),
    "trunc": lambda n, s: go_str(s)[:n],
    "trimSuffix": lambda suf, s: s[: -len(suf)] if suf and s.endswith(suf) else s,
    "contains": lambda sub, s: sub in s,
    "required": required,
}


# ---- checks ---------------------------------------------------------------------------------


def render_chart(values):
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    root = {
        "Values": values,
        "Chart": {
            "Name": chart["name"],
            "Version": chart["version"],
            "AppVersion": chart.get("appVersion"),
        },
        "Release": {"Name": "parley", "Namespace": "calls", "Service": "Helm"},
    }
    r = Renderer(root)
    templates = sorted((CHART / "templates").iterdir())
    for t in templates:
        if t.name.startswith("_"):
            r.load_defines(t.read_text())
    out = {}
    for t in templates:
        if t.name.startswith("_") or t.suffix not in (".yaml", ".yml"):
            continue
        try:
            out[t.name] = r.render(t.read_text())
        except TemplateError as e:
            raise TemplateError(f"{t.name}: {e}") from None
    return out


def known_config_keys():
    text = (REPO / "deploy" / "parley.sample.toml").read_text()
    return set(re.findall(r"^#?\s*([a-z_]+)\s*=", text, re.M)) | set(
        re.findall(r"^\[([a-z_]+)\]", text, re.M)
    )


def known_env():
    src = (REPO / "crates" / "parley" / "src" / "main.rs").read_text()
    return set(re.findall(r'env = "(PARLEY_[A-Z_]+)"', src)) | PLANNED_ENV


def check(name, rendered, problems):
    docs = []
    for file, text in rendered.items():
        try:
            parsed = [d for d in yaml.safe_load_all(text) if d is not None]
        except yaml.YAMLError as e:
            problems.append(f"{name}/{file}: invalid YAML: {e}\n{text}")
            continue
        for d in parsed:
            docs.append((file, d))
    config_keys, env_names = known_config_keys(), known_env()
    for file, d in docs:
        where = f"{name}/{file}"
        for field in ("apiVersion", "kind"):
            if not d.get(field):
                problems.append(f"{where}: no {field}")
        meta_name = (d.get("metadata") or {}).get("name", "")
        if not re.fullmatch(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?", meta_name or ""):
            problems.append(f"{where}: bad metadata.name {meta_name!r}")
        kind = d.get("kind")
        if kind == "ConfigMap":
            try:
                config = tomllib.loads(d["data"]["parley.toml"])
            except (KeyError, tomllib.TOMLDecodeError) as e:
                problems.append(f"{where}: parley.toml: {e}")
                continue
            for key in set(config) - config_keys:
                problems.append(f"{where}: parley.toml: unknown key {key}")
        if kind in ("Deployment", "DaemonSet"):
            spec = d["spec"]
            pod_labels = spec["template"]["metadata"]["labels"]
            for k, v in spec["selector"]["matchLabels"].items():
                if pod_labels.get(k) != v:
                    problems.append(f"{where}: selector {k}={v} does not match the pod")
            pod = spec["template"]["spec"]
            for c in pod["containers"]:
                ports = {p["name"] for p in c.get("ports", [])}
                for probe in ("readinessProbe", "livenessProbe"):
                    port = c[probe]["httpGet"]["port"]
                    if port not in ports:
                        problems.append(f"{where}: {probe} port {port} not declared")
                for e in c.get("env", []):
                    if e["name"] not in env_names:
                        problems.append(f"{where}: Parley does not read {e['name']}")
            if pod.get("terminationGracePeriodSeconds", 0) < 60:
                problems.append(f"{where}: no grace period for draining")
    kinds = sorted(d["kind"] for _, d in docs)
    return kinds


def check_mode(name, values, rendered, problems):
    """The mode is real: integrated runs everything in the host-networked Deployment; split runs
    signaling without media there and media nodes in a DaemonSet that dials the Service."""
    docs = [
        d for text in rendered.values() for d in yaml.safe_load_all(text) if d is not None
    ]
    by_kind = {}
    for d in docs:
        by_kind.setdefault(d["kind"], []).append(d)

    def pod(kind):
        objs = by_kind.get(kind, [])
        return objs[0]["spec"]["template"]["spec"] if objs else None

    def env(container, key):
        return next((e for e in container.get("env", []) if e["name"] == key), None)

    signaling = pod("Deployment")
    sig = signaling["containers"][0]
    if values["mode"] == "integrated":
        if not signaling.get("hostNetwork"):
            problems.append(f"{name}: integrated: the Deployment needs host networking")
        if "--no-local-media" in sig["args"] or "DaemonSet" in by_kind:
            problems.append(f"{name}: integrated: media must run in the Deployment")
        return
    if signaling.get("hostNetwork"):
        problems.append(f"{name}: split: signaling should not use host networking")
    if sig["args"][0] != "serve" or "--no-local-media" not in sig["args"]:
        problems.append(f"{name}: split: signaling must run serve --no-local-media: {sig['args']}")
    if by_kind["Deployment"][0]["spec"].get("strategy", {}).get("type") != "Recreate":
        problems.append(f"{name}: split: signaling must be replaced, not surged (Recreate)")
    if values["signaling"]["replicas"] != 1:
        problems.append(f"{name}: split: media nodes connect to one signaling process")
    media = pod("DaemonSet")
    if media is None:
        problems.append(f"{name}: split: no media DaemonSet")
        return
    node = media["containers"][0]
    if not media.get("hostNetwork") or node["args"][0] != "media":
        problems.append(f"{name}: split: the DaemonSet must run `parley media` on the host network")
    service = by_kind["Service"][0]
    want = "ws://{}.{}.svc:{}/media-node".format(
        service["metadata"]["name"], "calls", service["spec"]["ports"][0]["port"]
    )
    url = (env(node, "PARLEY_SIGNALING_URL") or {}).get("value")
    if url != want:
        problems.append(f"{name}: split: media nodes dial {url!r}, the Service is {want!r}")
    secret_name = values.get("existingSecret") or "parley"
    for who, c in (("signaling", sig), ("media", node)):
        ref = ((env(c, "PARLEY_NODE_SECRET") or {}).get("valueFrom") or {}).get("secretKeyRef")
        if not ref or ref.get("name") != secret_name or ref.get("key") != "PARLEY_NODE_SECRET":
            problems.append(f"{name}: split: {who} does not read PARLEY_NODE_SECRET from the Secret")
    if not values.get("existingSecret"):
        data = by_kind["Secret"][0].get("stringData", {})
        if not data.get("PARLEY_NODE_SECRET"):
            problems.append(f"{name}: split: the Secret has no PARLEY_NODE_SECRET")


def merge(base, extra):
    out = copy.deepcopy(base)
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = merge(out[k], v)
        else:
            out[k] = v
    return out


def main():
    defaults = yaml.safe_load((CHART / "values.yaml").read_text())
    everything = merge(
        defaults,
        {
            "mode": "split",
            "publicIp": ["203.0.113.7"],
            "publicIpFromHostIP": True,
            "maxParticipants": 50,
            "apiKeys": ["main:0123456789abcdef0123"],
            "webhook": {"urls": ["https://hooks.example.com/parley"], "secret": "s"},
            "turn": {"urls": ["turn:turn.example.com:3478"], "secret": "t"},
            "sysctlInit": {"enabled": True},
            "imagePullSecrets": [{"name": "registry"}],
            "service": {"annotations": {"a": "b"}},
            "nodeSecret": "0123456789abcdef-node",
            "signaling": {"nodeSelector": {"role": "signal"}},
            "media": {
                "nodeSelector": {"parley.io/media": "true"},
                "tolerations": [{"key": "media", "operator": "Exists"}],
            },
        },
    )
    integrated_extras = merge(everything, {"mode": "integrated", "existingSecret": "mine"})
    split_existing = merge(everything, {"existingSecret": "mine", "nodeSecret": ""})
    show = "--show" in sys.argv
    problems = []
    for name, values in [
        ("defaults", defaults),
        ("split+everything", everything),
        ("integrated+everything", integrated_extras),
        ("split+existingSecret", split_existing),
    ]:
        try:
            rendered = render_chart(values)
        except TemplateError as e:
            problems.append(f"{name}: {e}")
            continue
        if show:
            for file, text in rendered.items():
                print(f"# ---- {name}: {file}\n{text}")
        kinds = check(name, rendered, problems)
        check_mode(name, values, rendered, problems)
        print(f"{name}: {', '.join(kinds)}", file=sys.stderr)
    for p in problems:
        print(f"PROBLEM: {p}", file=sys.stderr)
    sys.exit(1 if problems else 0)


if __name__ == "__main__":
    main()
