"""Config validation before any work: a mistake in a config file or a `key=value` override becomes one line
(ldm.cli.UsageError) naming the key, the file it came from, what is wrong and the fix.

    sources = [(p, load_config_file(p)) for p in paths] + [("the command line", overrides_config(dotlist))]
    config = OmegaConf.merge(*(c for _, c in sources))
    check_config(config, sources, checkpoint_cls=ModelCheckpoint, run_keys=("data_root", ...))

What check_config checks (the first problem found is raised):
- top-level sections: model, data, lightning, run, sampling;
- every target node (`{target: dotted.path, params: {...}}`): its target imports, its sibling keys (target, params;
  model also base_learning_rate), and each `params` key is a parameter of the target. A `**kwargs` is followed:
  forwarded to `super().__init__` (the next class of the MRO) or to a named class or function, it accepts that
  one's parameters; only inspected (`if kwargs: warn`, `k not in _DEFAULTS`), it accepts the literal keys the code
  reads (`kwargs.get("x")`, `"x" in kwargs`) and the names of the option tables it checks them against; stored,
  set as attributes or handed on to code that cannot be read, it accepts any key. Target nodes among the params
  (unet_config, data's train, ...) are checked the same way;
- types, where a parameter's annotation is simple (int, float, bool, str, None, Literal, list/tuple/Sequence,
  dict/Mapping and unions of these) or, without one, from PARAM_TYPES or its default (int -> an integer,
  float -> a number, bool -> true or false, str -> a string, tuple/list -> a list; null is accepted; a None
  default or none: anything); interpolations (`${...}`) and `???` are not checked; a dotted name under
  `templates` must import;
- lightning: trainer (pytorch_lightning.Trainer's parameters and annotations), callbacks (target nodes),
  modelcheckpoint.params (the caller's checkpoint class);
- run: the keys the caller names;
- sampling: txt2img's defaults for the model (SAMPLING_KEYS: flag names and their types), e.g.
  `sampling: {H: 512, W: 512, ddim_steps: 50, scale: 7.5}`; flags given on the command line win.

untrusted_targets lists the dotted names a config would import (targets, caption templates) outside trusted
packages without importing anything: configs are code, so a saved run folder's configs are checked before use.
"""
import ast
import builtins
import collections.abc
import difflib
import functools
import importlib
import inspect
import io
import os
import re
import textwrap
import types
import typing

import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from ldm.cli import UsageError

__all__ = ["load_config_file", "overrides_config", "check_config", "check_sampling", "untrusted_targets",
           "COMMAND_LINE", "TRUSTED_MODULES", "SECTIONS", "LIGHTNING_SECTIONS", "SAMPLING_KEYS"]

COMMAND_LINE = "the command line"
SECTIONS = ("model", "data", "lightning", "run", "sampling")
# the `sampling` section: txt2img flags a model config may set the default of, and their kinds
SAMPLING_KEYS = {"H": {"int"}, "W": {"int"}, "ddim_steps": {"int"}, "scale": {"float"}}
LIGHTNING_SECTIONS = ("trainer", "callbacks", "modelcheckpoint", "logger")
# Keys a target node may hold besides target and params, by the node's path; their expected types.
NODE_EXTRAS = {("model",): {"base_learning_rate": {"int", "float"}}}
# Keys whose string value the framework imports as a dotted name (get_obj_from_str): targets, and the caption
# templates of ldm.data.personalized (e.g. templates: ldm.data.shapes.palette.TEMPLATES).
DOTTED_NAME_KEYS = ("target", "templates")
# String values that stand for "no module" in latent-diffusion configs (instantiate_from_config returns None).
# What a saved config may name without --trust_configs: this framework's modules and the torch and Lightning classes
# its configs use (untrusted_targets lists the rest).
TRUSTED_MODULES = ("ldm", "improvement", "make_log_new", "setup", "torch.nn", "torch.optim",
                   "pytorch_lightning.callbacks", "pytorch_lightning.loggers")
SENTINELS = ("__is_first_stage__", "__is_unconditional__")
_DOTTED = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)+")
# Types that neither an annotation nor a default gives, or where the default says less than the code accepts
# ("module.Class.param" -> kinds). Better still: an annotation on the parameter, which is read first.
PARAM_TYPES = {
    "ldm.data.datamodule.DataModuleFromConfig.batch_size": {"int"},
    "ldm.data.datamodule.DataModuleFromConfig.num_workers": {"int", "none"},
    "ldm.models.diffusion.ddpm.LatentDiffusion.compile": {"bool", "str"},  # true or a torch.compile backend
    "ldm.modules.diffusionmodules.openaimodel.UNetModel.dropout": {"int", "float"},
    **{f"ldm.modules.diffusionmodules.openaimodel.UNetModel.{name}": {"int"}
       for name in ("image_size", "in_channels", "model_channels", "out_channels", "num_res_blocks")},
    "ldm.modules.embedding_manager.EmbeddingManager.placeholder_strings": {"list", "str"},
    "ldm.modules.embedding_manager.EmbeddingManager.initializer_words": {"list", "str", "none"},
}


# ---- loading ----------------------------------------------------------------------------------------------
def load_config_file(path):
    """A YAML config file -> DictConfig; a missing file, a folder, malformed YAML (line and column) or a top level
    that is not a mapping -> UsageError."""
    path = os.fspath(path)
    if os.path.isdir(path):
        raise UsageError(f"config {path} is a folder, not a YAML file: give the .yaml file in it")
    if not os.path.isfile(path):
        raise UsageError(f"config not found: {path} (check the path; configs are .yaml files under configs/)")
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except UnicodeDecodeError:
        raise UsageError(f"config {path} is not a text file (not UTF-8): give a YAML config") from None
    except OSError as e:
        raise UsageError(f"cannot read config {path}: {e.strerror or e}") from None
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)  # the shape, with line numbers; nothing built
        if root is not None and not isinstance(root, yaml.MappingNode):
            kind = "a list" if isinstance(root, yaml.SequenceNode) else f"the value {root.value!r}"
            raise UsageError(f"config {path} holds {kind}, not a mapping of sections (model:, data:, lightning:): "
                             "write it as key: value lines")
        config = OmegaConf.load(io.StringIO(text))
    except yaml.YAMLError as e:
        raise UsageError(f"config {path} is not valid YAML{_yaml_where(e)}: fix that line") from None
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None)
        raise UsageError(f"config {path}: {f'{key}: ' if key else ''}{_first_line(e)}: fix the file") from None
    except OSError as e:  # an omegaconf version that rejects a scalar top level itself
        raise UsageError(f"config {path} is not a mapping of sections ({_first_line(e)})") from None
    if not isinstance(config, DictConfig):
        raise UsageError(f"config {path} is not a mapping of sections (model:, data:, lightning:)")
    return config


def overrides_config(dotlist):
    """`key=value` items (values parsed as YAML, as OmegaConf.from_dotlist does) -> DictConfig; an item that is not
    key=value, an empty key part or an unparsable value -> UsageError."""
    for item in dotlist:
        key, eq, _ = str(item).partition("=")
        if not eq:
            raise UsageError(f"'{item}' ({COMMAND_LINE}) is not key=value: write e.g. lightning.trainer.max_steps=1000")
        parts = key.split(".")
        if any(not p.strip() or p != p.strip() or any(c.isspace() for c in p) for p in parts):
            raise UsageError(f"'{item}' ({COMMAND_LINE}): '{key}' is not a dotted key (an empty or spaced part): "
                             "write e.g. model.params.latent_cache=false")
    try:
        return OmegaConf.from_dotlist(list(dotlist))
    except yaml.YAMLError as e:
        bad = next((i for i in dotlist if _bad_item(i)), None)
        what = f"'{bad}'" if bad else "an override"
        raise UsageError(f"{what} ({COMMAND_LINE}): the value is not valid YAML ({_yaml_problem(e)}): "
                         "close its brackets, or quote it") from None
    except OmegaConfBaseException as e:
        raise UsageError(f"the overrides ({COMMAND_LINE}): {_first_line(e)}") from None


def _bad_item(item):
    try:
        OmegaConf.from_dotlist([item])
    except Exception:
        return True
    return False


def _yaml_where(e):
    """' at line L, column C: the problem (the construct it is in, from line L, column C)' of a YAML error."""
    problem, mark = getattr(e, "problem", None), getattr(e, "problem_mark", None)
    context, start = getattr(e, "context", None), getattr(e, "context_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    text = " ".join(str(problem or e).split())
    if context and start is not None and (mark is None or start.line != mark.line):
        text += f" ({' '.join(context.split())} from line {start.line + 1}, column {start.column + 1})"
    elif context:
        text = f"{' '.join(context.split())}, {text}"
    return f"{where}: {text}"


def _yaml_problem(e):
    parts = [getattr(e, "context", None), getattr(e, "problem", None)]
    text = ", ".join(p for p in parts if p) or str(e)
    return " ".join(text.split())


def _first_line(e):
    return " ".join(str(e).strip().splitlines()[:1]) or type(e).__name__


# ---- the check --------------------------------------------------------------------------------------------
def check_config(config, sources=(), checkpoint_cls=None, run_keys=None, aliases=None, partial=False):
    """Raise UsageError (one line) at the first unknown key, wrong type or unimportable target of `config`.

    config: the merged config (DictConfig or dict). sources: the (name, config) pairs merged into it, in order
    (file paths, COMMAND_LINE): a problem names the last one that sets its key. checkpoint_cls: the class that
    lightning.modelcheckpoint.params are given to (unchecked without one). run_keys: the keys allowed under `run`
    (unchecked when None). aliases: {target in configs: the target actually built} (e.g. {"main.ImageLogger":
    "make_log_new.ImageLogger"}). partial: a lone overlay (model, data and callbacks need no target).
    """
    checker = _Checker(sources, checkpoint_cls, run_keys, aliases or {}, partial)
    checker.check(_plain(config))


def check_sampling(config, sources=()):
    """Check the `sampling` section of a merged model config alone (txt2img reads no other section's rules)."""
    node = _plain(config).get("sampling") if config is not None else None
    if node is not None and not _skipped(node):
        _Checker(sources, None, None, {}, True).sampling(("sampling",), node)


def _plain(config):
    if isinstance(config, (DictConfig, ListConfig)):
        return OmegaConf.to_container(config, resolve=False)
    return config


class _Checker:
    def __init__(self, sources, checkpoint_cls, run_keys, aliases, partial):
        self.sources = [(name, _plain(c)) for name, c in sources]
        self.checkpoint_cls, self.aliases, self.partial = checkpoint_cls, aliases, partial
        self.run_keys = None if run_keys is None else tuple(run_keys)

    # -- reporting --
    def source(self, path):
        for name, cfg in reversed(self.sources):
            if _has_path(cfg, path):
                return name
        return "the merged config" if self.sources else "the config"

    def fail(self, path, problem, fix=""):
        raise UsageError(f"{_dotted(path)}: {problem} ({self.source(path)}){': ' + fix if fix else ''}")

    def unknown(self, path, known, what):
        key = str(path[-1])
        close = difflib.get_close_matches(key, [str(k) for k in known], n=1, cutoff=0.6)
        if not close:
            close = [k for k in known if str(k).lower() == key.lower()]
        if close:
            fix = f"did you mean {_dotted(path[:-1] + (close[0],))}?"
        elif len(known) <= 12:
            fix = f"remove it (known: {', '.join(map(str, known)) or 'none'})"
        else:
            fix = "remove it or check the spelling"
        self.fail(path, f"unknown key, {what}", fix)

    def expect_mapping(self, path, value):
        if not isinstance(value, dict):
            self.fail(path, f"expected a mapping of keys, got {_show(value)}", "write it as indented key: value lines")

    # -- sections --
    def check(self, config):
        if not isinstance(config, dict):
            raise UsageError(f"the config is {_show(config)}, not a mapping of sections ({', '.join(SECTIONS)})")
        for key, value in config.items():
            path = (key,)
            if key not in SECTIONS:
                self.unknown(path, SECTIONS, "not a config section")
            if value is None or _skipped(value):
                continue
            if key in ("model", "data"):
                self.expect_mapping(path, value)
                self.target_node(path, value, required=not self.partial)
            elif key == "lightning":
                self.lightning(path, value)
            elif key == "sampling":
                self.sampling(path, value)
            elif key == "run":
                self.expect_mapping(path, value)
                if self.run_keys is not None:
                    for k in value:
                        if k not in self.run_keys:
                            self.unknown(path + (k,), self.run_keys, "not a run setting")

    def sampling(self, path, node):
        self.expect_mapping(path, node)
        for key, value in node.items():
            if key not in SAMPLING_KEYS:
                self.unknown(path + (key,), list(SAMPLING_KEYS), "not a txt2img setting")
            problem = None if _skipped(value) else _type_problem(value, SAMPLING_KEYS[key])
            if problem:
                self.fail(path + (key,), problem, "e.g. sampling: {H: 512, W: 512, ddim_steps: 50, scale: 7.5}")

    def lightning(self, path, node):
        self.expect_mapping(path, node)
        for key, value in node.items():
            sub = path + (key,)
            if key not in LIGHTNING_SECTIONS:
                self.unknown(sub, LIGHTNING_SECTIONS, "not a lightning section")
            if value is None or _skipped(value):
                continue
            if key == "logger":  # names of loggers: "tensorboard,wandb" or [tensorboard, wandb]
                names = value if isinstance(value, list) else [value]
                if not all(isinstance(n, str) for n in names):
                    self.fail(sub, f"expected logger names, got {_show(value)}", "e.g. logger: [tensorboard, wandb]")
                continue
            self.expect_mapping(sub, value)
            if key == "trainer":
                import pytorch_lightning as pl
                self.params(sub, value, pl.Trainer, "pytorch_lightning.Trainer")
            elif key == "callbacks":
                for name, cb in value.items():
                    if cb is None or _skipped(cb):
                        continue
                    self.expect_mapping(sub + (name,), cb)
                    self.target_node(sub + (name,), cb, required=not self.partial, siblings=list(value))
            elif key == "modelcheckpoint":
                for k, v in value.items():
                    if k != "params":
                        self.unknown(sub + (k,), ("params",), "not a modelcheckpoint setting")
                    if self.checkpoint_cls is not None and v is not None and not _skipped(v):
                        self.expect_mapping(sub + (k,), v)
                        self.params(sub + (k,), v, self.checkpoint_cls, _name_of(self.checkpoint_cls))

    # -- target nodes --
    def target_node(self, path, node, required=True, siblings=()):
        """A mapping that is (or, at `path`, must be) {target, params, extras}."""
        target = node.get("target")
        params = node.get("params")
        params = {} if params is None or _skipped(params) else params
        obj = None
        if target is not None and not _skipped(target):
            if not isinstance(target, str):
                self.fail(path + ("target",), f"expected a dotted name, got {_show(target)}",
                          "write e.g. target: ldm.models.diffusion.ddpm.LatentDiffusion")
            obj = self.import_target(path + ("target",), self.aliases.get(target, target))
        extras = NODE_EXTRAS.get(tuple(path), {})
        allowed = ("target", "params", *extras)
        for key, value in node.items():
            if key not in allowed:
                if obj is not None and key in _accepted_params(obj)[0]:
                    self.fail(path + (key,), "unknown key, a parameter outside params",
                              f"did you mean {_dotted(path + ('params', key))}?")
                self.unknown(path + (key,), allowed, "not a key of a config node")
            if key in extras and not _skipped(value):
                problem = _type_problem(value, extras[key])
                if problem:
                    self.fail(path + (key,), problem)
        self.expect_mapping(path + ("params",), params)
        if obj is not None:
            self.params(path + ("params",), params, obj, self.aliases.get(target, target))
        elif target is None:
            if required and "target" not in node:
                others = [str(k) for k in siblings if k != path[-1]]
                close = difflib.get_close_matches(str(path[-1]), others, n=1, cutoff=0.6)
                fix = (f"did you mean {_dotted(path[:-1] + (close[0],))}?" if close else
                       "add target: <dotted.path.Class> (e.g. from the model's config.yaml)")
                self.fail(path, "has no target", fix)
            self.nested(path + ("params",), params)  # an overlay alone: its nested nodes are still checked

    def import_target(self, path, target):
        from ldm.util import get_obj_from_str
        try:
            return get_obj_from_str(target)
        except (ImportError, ValueError) as e:
            fix = "check the dotted path"
            module, _, name = target.rpartition(".")
            try:
                names = [n for n in dir(importlib.import_module(module)) if not n.startswith("_")] if module else []
            except ImportError:
                names = []
            close = difflib.get_close_matches(name, names, n=1)
            if close:
                fix = f"did you mean {module}.{close[0]}?"
            self.fail(path, " ".join(str(e).split()), fix)

    def params(self, path, params, obj, label):
        accepted, open_ = _accepted_params(obj)
        for key, value in params.items():
            sub = path + (key,)
            spec = accepted.get(key)
            if spec is None and not open_:
                self.unknown(sub, sorted(accepted), f"not a parameter of {label}")
            if spec is not None and not _skipped(value):
                kinds = _expected_kinds(spec)
                problem = kinds and _type_problem(value, kinds)
                if problem:
                    self.fail(sub, problem)
            if key in DOTTED_NAME_KEYS and isinstance(value, str) and _DOTTED.fullmatch(value):
                self.import_target(sub, value)  # e.g. templates: ldm.data.shapes.palette.TEMPLATES
            self.nested(sub, value)

    def nested(self, path, value):
        """Target nodes inside a parameter's value (unet_config, data's train, lists of nodes)."""
        if isinstance(value, dict):
            if "target" in value:
                self.target_node(path, value)
            else:
                for k, v in value.items():
                    self.nested(path + (k,), v)
        elif isinstance(value, list):
            for i, v in enumerate(value):
                self.nested(path + (i,), v)


def _has_path(cfg, path):
    node = cfg
    for key in path:
        if isinstance(node, dict) and key in node:
            node = node[key]
        elif isinstance(node, list) and isinstance(key, int) and key < len(node):
            node = node[key]
        else:
            return False
    return True


def _dotted(path):
    out = ""
    for key in path:
        out += f"[{key}]" if isinstance(key, int) else (f".{key}" if out else str(key))
    return out or "the config"


def _skipped(value):
    """Interpolations and missing values (???) are not checked."""
    return isinstance(value, str) and ("${" in value or value == "???")


def _name_of(obj):
    return f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', getattr(obj, '__name__', obj))}"


# ---- types ------------------------------------------------------------------------------------------------
_DESCRIBE = {"int": "an integer", "float": "a number", "str": "a string",
             "list": "a list", "dict": "a mapping", "none": "null"}
_ANY = "any"


def _kind(value):
    if isinstance(value, bool):
        return "bool"
    for kind, t in (("int", int), ("float", float), ("str", str), ("list", (list, tuple)), ("dict", dict)):
        if isinstance(value, t):
            return kind
    return "none" if value is None else type(value).__name__


def _show(value):
    if isinstance(value, str):
        return f"'{value}'"
    if isinstance(value, bool):
        return str(value).lower()
    if value is None:
        return "null"
    text = str(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _type_problem(value, kinds):
    """-> None when `value` fits `kinds` (kind names, Literal choices as tuples), else "expected ..., got ..."."""
    names = {k for k in kinds if isinstance(k, str)}
    choices = tuple(c for k in kinds if isinstance(k, tuple) for c in k)
    if "float" in names:
        names.add("int")
    if _kind(value) in names or any(type(value) is type(c) and value == c for c in choices):
        return None
    wanted = ["true", "false"] if "bool" in names else []
    wanted += [_DESCRIBE[k] for k in ("int", "float", "str", "list", "dict") if k in names
               and not (k == "int" and "float" in names)]
    if choices:
        wanted.insert(0, "one of " + ", ".join(_show(c) for c in choices))
    if "none" in names:
        wanted.append("null")
    text = wanted[0] if len(wanted) == 1 else f"{', '.join(wanted[:-1])} or {wanted[-1]}"
    return f"expected {text}, got {_show(value)}"


_SIMPLE = {int: {"int"}, float: {"float"}, bool: {"bool"}, str: {"str"}, type(None): {"none"},
           list: {"list"}, tuple: {"list"}, dict: {"dict"}}
_SEQUENCES = (list, tuple, collections.abc.Sequence, collections.abc.MutableSequence, typing.Sequence, typing.List,
              typing.Tuple)
_MAPPINGS = (dict, collections.abc.Mapping, collections.abc.MutableMapping, typing.Mapping, typing.Dict)


def _annotation_kinds(ann):
    """A simple annotation -> collection of kinds (Literal choices as a tuple member); _ANY; None when not simple."""
    if ann is typing.Any:
        return _ANY
    if ann in _SIMPLE:
        return set(_SIMPLE[ann])
    origin = typing.get_origin(ann)
    if origin is typing.Union or (hasattr(types, "UnionType") and origin is types.UnionType):
        out = []  # ordered: Literal choices are listed as the annotation gives them
        for arg in typing.get_args(ann):
            kinds = _annotation_kinds(arg)
            if kinds is None or kinds == _ANY:
                return kinds
            out += [k for k in kinds if k not in out]
        return out
    if origin is typing.Literal:
        return {tuple(typing.get_args(ann))}
    if ann in _SEQUENCES or origin in _SEQUENCES:
        return {"list"}
    if ann in _MAPPINGS or origin in _MAPPINGS:
        return {"dict"}
    return None


def _expected_kinds(spec):
    """A parameter (inspect.Parameter, owner label) -> kinds to check, or None (anything)."""
    param, owner = spec
    if param is None:
        return None
    ann = param.annotation
    if ann is not inspect.Parameter.empty and not isinstance(ann, str):
        kinds = _annotation_kinds(ann)
        return None if kinds in (None, _ANY) else kinds
    known = PARAM_TYPES.get(f"{owner}.{param.name}")
    if known:
        return known
    default = param.default
    if default is inspect.Parameter.empty or default is None:
        return None
    for t in (bool, int, float, str, list, tuple, dict):
        if type(default) is t:
            return set(_SIMPLE[t]) | {"none"}
    return None


# ---- signatures, following **kwargs -------------------------------------------------------------------------
# Uses of a **kwargs dict that only look at it (to warn or raise about its keys); any other use (stored, copied,
# returned, handed to code that cannot be read, setattr over its keys) makes it open: any key is accepted.
_NEUTRAL_BUILTINS = {"sorted", "len", "iter", "next", "bool", "str", "repr", "any", "all", "isinstance", "print",
                     "format"}
_NEUTRAL_METHODS = {"items", "keys", "values", "get", "pop", "__contains__", "setdefault"}


@functools.lru_cache(maxsize=None)
def _accepted_params(obj):
    """A class or function -> ({name: (inspect.Parameter or None, owner label)}, open: accepts any key)."""
    if inspect.isclass(obj):
        return _class_params(obj, 0, frozenset())
    return _function_params(obj, None, 0, frozenset())


def _class_params(cls, start, seen):
    mro = inspect.getmro(cls)
    for i in range(start, len(mro)):
        if "__init__" in vars(mro[i]):
            if mro[i] is object:
                return {}, False
            return _function_params(vars(mro[i])["__init__"], cls, i, seen)
    return {}, False


def _owner_label(func, cls, index):
    if cls is not None:
        owner = inspect.getmro(cls)[index]
        return f"{owner.__module__}.{owner.__qualname__}"
    return f"{getattr(func, '__module__', '?')}.{getattr(func, '__qualname__', '?')}"


def _signature(func):
    try:
        return inspect.signature(func, eval_str=True)
    except Exception:
        try:
            return inspect.signature(func)
        except (TypeError, ValueError):
            return None


def _function_params(func, cls, index, seen):
    """Parameters of `func` (the __init__ of cls's MRO entry `index`, or a plain function when cls is None)."""
    key = (id(func), id(cls), index)
    if key in seen:
        return {}, False
    seen = seen | {key}
    sig = _signature(func)
    if sig is None:
        return {}, True
    label = _owner_label(func, cls, index)
    names = list(sig.parameters.values())
    if names and (cls is not None or names[0].name in ("self", "cls")) and not isinstance(func, types.MethodType):
        names = names[1:]  # self
    accepted, var_kw = {}, None
    for p in names:
        if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY):
            accepted[p.name] = (p, label)
        elif p.kind == p.VAR_KEYWORD:
            var_kw = p.name
    if var_kw is None:
        return accepted, False
    extra, open_ = _dict_param_keys(func, var_kw, cls, index, seen)
    for name, spec in extra.items():
        accepted.setdefault(name, spec)
    return accepted, open_


def _function_tree(func):
    try:
        source = textwrap.dedent(inspect.getsource(inspect.unwrap(func)))
        tree = ast.parse(source)
    except (OSError, TypeError, SyntaxError, IndentationError):
        return None
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            return node
    return None


def _dict_param_keys(func, name, cls, index, seen):
    """What the dict parameter `name` of `func` (a **kwargs, or a dict handed on positionally) accepts ->
    ({key: spec}, open)."""
    tree = _function_tree(func)
    if tree is None:
        return {}, True
    parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
    label = _owner_label(func, cls, index)
    accepted = {}

    def add(extra):
        for k, spec in extra.items():
            accepted.setdefault(k, spec)

    for node in ast.walk(tree):
        if not (isinstance(node, ast.Name) and node.id == name and isinstance(node.ctx, ast.Load)):
            continue
        parent = parents.get(node)
        if isinstance(parent, ast.keyword) and parent.arg is None:  # f(**name): f's parameters
            extra, open_ = _callee_params(parents[parent].func, func, cls, index, seen)
            if open_:
                return {}, True
            add(extra)
        elif isinstance(parent, ast.Call) and node in parent.args:  # f(name): what f does with it
            callee = _resolve_callee(parent.func, func, cls)
            if isinstance(parent.func, ast.Name) and parent.func.id in _NEUTRAL_BUILTINS and \
                    callee is getattr(builtins, parent.func.id, None):
                continue
            sig = _signature(callee) if inspect.isfunction(callee) else None
            params = list(sig.parameters.values()) if sig else []
            position = parent.args.index(node)
            if position >= len(params) or params[position].kind not in (
                    inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD):
                return {}, True
            extra, open_ = _dict_param_keys(callee, params[position].name, None, 0, seen)
            if open_:
                return {}, True
            add(extra)
        elif isinstance(parent, ast.Attribute) and parent.attr in _NEUTRAL_METHODS:
            call = parents.get(parent)
            if isinstance(call, ast.Call) and parent.attr in ("get", "pop", "setdefault") and call.args and \
                    isinstance(call.args[0], ast.Constant) and isinstance(call.args[0].value, str):
                accepted.setdefault(call.args[0].value, (None, label))
        elif isinstance(parent, ast.Subscript) and parent.value is node:
            if isinstance(parent.slice, ast.Constant) and isinstance(parent.slice.value, str):
                accepted.setdefault(parent.slice.value, (None, label))
        elif isinstance(parent, ast.Compare) and node in parent.comparators:  # "x" in name
            if isinstance(parent.left, ast.Constant) and isinstance(parent.left.value, str):
                accepted.setdefault(parent.left.value, (None, label))
        elif not isinstance(parent, (ast.If, ast.IfExp, ast.While, ast.BoolOp, ast.UnaryOp, ast.FormattedValue,
                                     ast.comprehension, ast.For, ast.Assert)):
            return {}, True  # stored, returned or handed to code this check cannot follow
    loop_vars = _loop_keys(tree, name)
    for node in ast.walk(tree):  # setattr(self, k, v) over the keys: any key becomes an attribute
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "setattr" and \
                any(isinstance(a, ast.Name) and a.id in loop_vars for a in node.args):
            return {}, True
    for key in _option_tables(tree, loop_vars, func, cls):
        accepted.setdefault(key, (None, label))
    return accepted, False


def _loop_keys(tree, name):
    """The variables that run over the keys of dict `name` (`for k in name`, `for k, v in name.items()`)."""
    loop_vars = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.comprehension, ast.For)):
            it = node.iter
            if isinstance(it, ast.Call) and isinstance(it.func, ast.Attribute) and it.func.attr in ("items", "keys"):
                it = it.func.value
            if isinstance(it, ast.Name) and it.id == name:
                target = node.target.elts[0] if isinstance(node.target, ast.Tuple) else node.target
                if isinstance(target, ast.Name):
                    loop_vars.add(target.id)
    return loop_vars


def _option_tables(tree, loop_vars, func, cls):
    """The names in the option tables that the keys (`loop_vars`) of a dict are tested against, as in
    `{k: v for k, v in name.items() if k not in _DEFAULTS}` or `for k in name: if k in self._KNOWN`."""
    keys = []
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Compare) and isinstance(node.left, ast.Name) and node.left.id in loop_vars):
            continue
        for op, comp in zip(node.ops, node.comparators):
            if not isinstance(op, (ast.In, ast.NotIn)):
                continue
            table = _resolve_expr(comp, func, cls)
            if isinstance(table, (dict, list, tuple, set, frozenset)) and table and \
                    all(isinstance(k, str) for k in table):
                keys.extend(table)
    return keys


def _resolve_expr(expr, func, cls):
    """A Name or dotted Attribute (self.X, cls.X, module.X) -> its value, or None."""
    if isinstance(expr, ast.Name):
        scope = getattr(inspect.unwrap(func), "__globals__", {})
        if expr.id in scope:
            return scope[expr.id]
        return getattr(builtins, expr.id, None)
    if isinstance(expr, ast.Attribute):
        if isinstance(expr.value, ast.Name) and expr.value.id in ("self", "cls") and cls is not None:
            return inspect.getattr_static(cls, expr.attr, None)
        base = _resolve_expr(expr.value, func, cls)
        return getattr(base, expr.attr, None) if base is not None else None
    return None


def _resolve_callee(expr, func, cls):
    if isinstance(expr, ast.Attribute) and isinstance(expr.value, ast.Name) and expr.value.id in ("self", "cls"):
        return getattr(cls, expr.attr, None) if cls is not None else None
    return _resolve_expr(expr, func, cls)


def _callee_params(expr, func, cls, index, seen):
    """The keys accepted by the callee of f(**kwargs) -> ({name: spec}, open)."""
    if isinstance(expr, ast.Attribute) and expr.attr == "__init__" and isinstance(expr.value, ast.Call) and \
            isinstance(expr.value.func, ast.Name) and expr.value.func.id == "super":
        if cls is None:
            return {}, True
        return _class_params(cls, index + 1, seen)
    callee = _resolve_callee(expr, func, cls)
    if inspect.isclass(callee):
        return _class_params(callee, 0, seen)
    if inspect.isfunction(callee) or inspect.ismethod(callee):
        return _function_params(callee, None, 0, seen)
    return {}, True


# ---- trust ------------------------------------------------------------------------------------------------
def untrusted_targets(config, trusted_prefixes):
    """The names `config` would import (the string value of every `target`, and of the other DOTTED_NAME_KEYS
    such as a dataset's `templates`) that are not under one of `trusted_prefixes` (packages or modules, e.g.
    ("ldm", "improvement", "make_log_new", "torch.nn")), in order, each once, without importing anything.
    An interpolation (`${...}`) is listed too: what it names is not known before it is resolved."""
    prefixes = tuple(p.rstrip(".") for p in trusted_prefixes)
    found = []

    def trusted(name):
        return any(name == p or name.startswith(p + ".") for p in prefixes)

    def walk(node):
        if isinstance(node, dict):
            for key, value in node.items():
                if key in DOTTED_NAME_KEYS and isinstance(value, str) and value not in SENTINELS:
                    if ("${" in value or not trusted(value.strip())) and value not in found:
                        found.append(value)
                else:
                    walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(_plain(config))
    return found
