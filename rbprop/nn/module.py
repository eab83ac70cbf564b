"""Modules: parameters, buffers and sub-modules, with PyTorch's names.

A :class:`Module` registers what is assigned to its attributes: a
:class:`Parameter` becomes a parameter, another module a child, and arrays
passed to :meth:`Module.register_buffer` become buffers (state that is saved
but not trained, such as batch-norm running statistics).

Each module knows its dotted *path* from the root of the tree it was attached
to (``"blocks.0.attn"``; the root's path is ``""``), set when it is assigned to
a parent. Calling a module runs ``forward`` inside
:func:`rbprop.sampling.module_scope` with that path, so sketch policies can
name modules (``{"blocks.*.attn": "bernoulli:0.5"}``).
"""

from __future__ import annotations

import functools
from collections import OrderedDict, namedtuple

import numpy as np

from ..backend import device_of, is_array, to_device, to_numpy
from ..sampling import module_scope
from ..tensor import Tensor


class Parameter(Tensor):
    """A tensor that a module trains: a leaf that requires a gradient (float32 by default)."""

    def __init__(self, data, requires_grad: bool = True):
        if isinstance(data, Tensor):
            data = data.data
        if not is_array(data):
            data = np.asarray(data, dtype=np.float32)
        super().__init__(data, requires_grad=requires_grad)

    def __repr__(self) -> str:
        return f"Parameter(shape={self.shape}, dtype={self.dtype}, device={self.device!r})"


class StateDictError(ValueError):
    """A state dict does not fit a module (missing or unexpected keys, wrong shapes)."""


IncompatibleKeys = namedtuple("IncompatibleKeys", ["missing_keys", "unexpected_keys"])


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


class Module:
    """Base class of layers and models: subclasses set attributes and write ``forward``."""

    def __init__(self):
        object.__setattr__(self, "training", True)
        object.__setattr__(self, "_path", "")
        object.__setattr__(self, "_buffer_names", [])

    # -- registration ------------------------------------------------------

    def __setattr__(self, name: str, value) -> None:
        if "_path" not in self.__dict__:
            raise RuntimeError(
                f"{type(self).__name__}: call super().__init__() before assigning attributes"
            )
        if isinstance(value, Module):
            value._set_path(_join(self._path, name))
        object.__setattr__(self, name, value)

    def _set_path(self, path: str) -> None:
        """Give this module and its descendants their dotted paths under ``path``."""
        object.__setattr__(self, "_path", path)
        for name, child in self.named_children():
            child._set_path(_join(path, name))

    @property
    def path(self) -> str:
        """The dotted path of this module in the tree it belongs to (``""`` for the root)."""
        return self._path

    def register_buffer(self, name: str, array) -> None:
        """Keep ``array`` (a numpy/cupy array, or None) as saved, untrained state."""
        if array is not None and not is_array(array):
            raise TypeError(f"register_buffer: {name!r} must be an array, got {type(array)}")
        if name not in self._buffer_names:
            self._buffer_names.append(name)
        object.__setattr__(self, name, array)

    def add_module(self, name: str, module: Module) -> None:
        """Register ``module`` as a child called ``name`` (names may be digits)."""
        if not isinstance(module, Module):
            raise TypeError(f"add_module: {name!r} must be a Module, got {type(module)}")
        setattr(self, name, module)

    # -- traversal ---------------------------------------------------------

    def named_children(self):
        for name, value in vars(self).items():
            if isinstance(value, Module):
                yield name, value

    def children(self):
        for _, child in self.named_children():
            yield child

    def named_modules(self, prefix: str = ""):
        """``(path, module)`` for this module and every descendant, each once, parents first."""
        seen = set()
        stack = [(prefix, self)]
        while stack:
            path, module = stack.pop()
            if id(module) in seen:
                continue
            seen.add(id(module))
            yield path, module
            children = list(module.named_children())
            stack.extend((_join(path, name), child) for name, child in reversed(children))

    def modules(self):
        for _, module in self.named_modules():
            yield module

    def named_parameters(self, prefix: str = ""):
        """``(dotted name, parameter)`` for every parameter, shared ones once."""
        seen = set()
        for path, module in self.named_modules(prefix):
            for name, value in vars(module).items():
                if isinstance(value, Parameter) and id(value) not in seen:
                    seen.add(id(value))
                    yield _join(path, name), value

    def parameters(self):
        for _, param in self.named_parameters():
            yield param

    def named_buffers(self, prefix: str = ""):
        for path, module in self.named_modules(prefix):
            for name in module._buffer_names:
                array = getattr(module, name)
                if array is not None:
                    yield _join(path, name), array

    def num_parameters(self) -> int:
        return sum(param.size for param in self.parameters())

    # -- modes and devices -------------------------------------------------

    def train(self, mode: bool = True) -> Module:
        """Training mode (dropout active, batch norm uses batch statistics); returns self."""
        for module in self.modules():
            object.__setattr__(module, "training", bool(mode))
        return self

    def eval(self) -> Module:
        """Evaluation mode; returns self."""
        return self.train(False)

    def zero_grad(self) -> None:
        """Forget every parameter's gradient."""
        for param in self.parameters():
            param.grad = None

    def to(self, target) -> Module:
        """Move to a device (``"cpu"``, ``"gpu"``) or cast to a float dtype, in place.

        Parameters stay the same objects, so an optimizer built before the call
        keeps referring to them (its own buffers are not moved). Returns self.
        """
        if isinstance(target, str) and target in ("cpu", "gpu"):
            convert = functools.partial(to_device, device=target)
        else:
            dtype = np.dtype(target)
            if not np.issubdtype(dtype, np.floating):
                raise TypeError(f"Module.to: {dtype} is not a floating-point dtype")
            convert = functools.partial(_cast_floating, dtype=dtype)
        for param in self.parameters():
            param.data = convert(param.data)
            if param.grad is not None:
                param.grad = Tensor(convert(param.grad.data))
        for module in self.modules():
            for name in module._buffer_names:
                array = getattr(module, name)
                if array is not None:
                    object.__setattr__(module, name, convert(array))
        return self

    def double(self) -> Module:
        """Cast parameters and floating buffers to float64 (for gradient checks)."""
        return self.to(np.float64)

    # -- calling -----------------------------------------------------------

    def forward(self, *args, **kwargs):
        raise NotImplementedError(f"{type(self).__name__}: forward is not written")

    def __call__(self, *args, **kwargs):
        with module_scope(self._path):
            return self.forward(*args, **kwargs)

    # -- state dicts -------------------------------------------------------

    def _state_entries(self) -> dict:
        """Dotted name -> (owning module, attribute name) of every parameter and buffer."""
        entries = {}
        for path, module in self.named_modules():
            for name, value in vars(module).items():
                if isinstance(value, Parameter):
                    entries.setdefault(_join(path, name), (module, name))
            for name in module._buffer_names:
                if getattr(module, name) is not None:
                    entries.setdefault(_join(path, name), (module, name))
        return entries

    def state_dict(self) -> OrderedDict:
        """Dotted name -> numpy copy of every parameter and buffer."""
        state = OrderedDict()
        for key, (module, name) in self._state_entries().items():
            value = getattr(module, name)
            state[key] = to_numpy(value.data if isinstance(value, Tensor) else value).copy()
        return state

    def check_state_dict(self, state: dict, strict: bool = True) -> IncompatibleKeys:
        """Raise :class:`StateDictError` if ``state`` does not fit this module (changes nothing).

        Shapes must always match; with ``strict``, the keys must match exactly too.
        """
        entries = self._state_entries()
        missing = [key for key in entries if key not in state]
        unexpected = [key for key in state if key not in entries]
        problems = []
        if strict and missing:
            problems.append(f"missing keys {missing}")
        if strict and unexpected:
            problems.append(f"unexpected keys {unexpected}")
        for key, (module, name) in entries.items():
            if key not in state:
                continue
            current = getattr(module, name)
            shape = tuple(current.shape)
            value = state[key]
            if not hasattr(value, "shape") or tuple(value.shape) != shape:
                found = tuple(value.shape) if hasattr(value, "shape") else type(value).__name__
                problems.append(f"{key!r} has shape {found} in the state dict, {shape} here")
            elif not np.issubdtype(np.asarray(to_numpy(value)).dtype, np.number):
                problems.append(f"{key!r} is not numeric ({value.dtype})")
        if problems:
            raise StateDictError(
                f"{type(self).__name__}.load_state_dict: "
                + "; ".join(problems)
                + " (nothing was loaded)"
            )
        return IncompatibleKeys(missing, unexpected)

    def load_state_dict(self, state: dict, strict: bool = True) -> IncompatibleKeys:
        """Copy ``state``'s arrays into the parameters and buffers, all or nothing.

        Everything is checked first (:meth:`check_state_dict`); on any mismatch
        nothing is changed. Values keep each parameter's dtype and device.
        """
        result = self.check_state_dict(state, strict)
        for key, (module, name) in self._state_entries().items():
            if key not in state:
                continue
            current = getattr(module, name)
            target = current.data if isinstance(current, Tensor) else current
            value = np.asarray(to_numpy(state[key]), dtype=target.dtype)
            target[...] = to_device(value, device_of(target))
        return result

    # -- printing ----------------------------------------------------------

    def extra_repr(self) -> str:
        return ""

    def __repr__(self) -> str:
        children = list(self.named_children())
        head = f"{type(self).__name__}({self.extra_repr()}"
        if not children:
            return head + ")"
        lines = [head]
        for name, child in children:
            body = repr(child).replace("\n", "\n  ")
            lines.append(f"  ({name}): {body}")
        return "\n".join(lines) + "\n)"


def _cast_floating(array, dtype):
    """``array`` as ``dtype`` if it holds floats (integer buffers keep their type)."""
    return array.astype(dtype) if np.issubdtype(array.dtype, np.floating) else array


class Sequential(Module):
    """Modules applied one after another; children are named ``"0"``, ``"1"``, ..."""

    def __init__(self, *modules: Module):
        super().__init__()
        for module in modules:
            self.append(module)

    def append(self, module: Module) -> Sequential:
        self.add_module(str(len(self)), module)
        return self

    def __len__(self) -> int:
        return sum(1 for _ in self.named_children())

    def __getitem__(self, index: int) -> Module:
        children = [child for _, child in self.named_children()]
        return children[index]

    def __iter__(self):
        return self.children()

    def forward(self, x):
        for module in self.children():
            x = module(x)
        return x


class ModuleList(Module):
    """A list of modules (children ``"0"``, ``"1"``, ...) that the owner calls itself."""

    def __init__(self, modules=()):
        super().__init__()
        for module in modules:
            self.append(module)

    append = Sequential.append
    __len__ = Sequential.__len__
    __getitem__ = Sequential.__getitem__
    __iter__ = Sequential.__iter__
