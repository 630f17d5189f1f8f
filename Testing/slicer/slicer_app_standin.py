"""A minimal stand-in for what the Slicer application adds to the slicer-core wheel, so that ``SemiSeg.py`` can be
imported and its widget opened headlessly: the ``qt`` module (widgets built from the real ``SemiSeg.ui``, signals,
timers), ``slicer.app``, ``slicer.ScriptedLoadableModule``, ``slicer.parameterNodeWrapper`` and ``slicer.i18n``.

Only what SemiSeg.py uses, and strict: an attribute the stand-in does not know raises AttributeError, a widget and a
parameter type without a GUI connector raise as Slicer does. MRML (scene, nodes, segmentations) and ``slicer.util``
are the real wheel's. Parameters are stored on the node as Slicer's parameterNodeWrapper stores them (strings,
"True"/"False", node references).
"""
from __future__ import annotations

import builtins
import sys
import types
import typing
import unittest
import xml.etree.ElementTree as ET

SIGNALS = {"clicked", "currentPathChanged", "currentIndexChanged", "stateChanged", "toggled", "valueChanged",
           "currentNodeChanged", "cellDoubleClicked", "textChanged", "timeout", "mrmlSceneChanged"}
PROPERTIES = {"text", "currentPath", "checked", "value", "enabled", "visible", "currentIndex", "toolTip", "name",
              "objectName", "wordWrap", "minimum", "maximum", "filters", "nodeTypes", "title", "collapsed", "isEntered"}


class Signal:
    def __init__(self):
        self.slots = []

    def connect(self, slot):
        self.slots.append(slot)

    def disconnect(self, slot):
        self.slots.remove(slot)

    def emit(self, *args):
        for slot in list(self.slots):
            slot(*args[:_arity(slot, len(args))])  # like PythonQt: a slot may take fewer arguments than the signal


def _arity(slot, most: int) -> int:
    import inspect

    try:
        parameters = inspect.signature(slot).parameters.values()
    except (TypeError, ValueError):
        return most
    if any(p.kind == p.VAR_POSITIONAL for p in parameters):
        return most
    return min(most, sum(p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.default is p.empty
                         for p in parameters))


class Widget:
    """A widget of a given Qt class: named properties, signals by name, children."""

    def __init__(self, class_name: str, name: str = "", dynamic: dict | None = None):
        object.__setattr__(self, "_class", class_name)
        object.__setattr__(self, "_props", {"name": name, "objectName": name, "text": "", "enabled": True,
                                            "visible": True, "currentPath": "", "checked": False, "value": 0,
                                            "currentIndex": -1, "minimum": 0, "maximum": 99})
        object.__setattr__(self, "_signals", {})
        object.__setattr__(self, "_children", [])
        object.__setattr__(self, "_dynamic", dict(dynamic or {}))
        object.__setattr__(self, "_items", [])  # combo box (text, data); table rows
        object.__setattr__(self, "_node", None)
        object.__setattr__(self, "_current_row", -1)

    # -- Qt-like API
    def className(self):
        return self._class

    def children(self):
        return list(self._children)

    def property(self, name):
        return self._dynamic.get(name)

    def signal(self, name) -> Signal:
        return self._signals.setdefault(name, Signal())

    def connect(self, signature: str, slot):
        name = signature.split("(")[0]
        if name not in SIGNALS:
            raise AttributeError(f"{self._class} stand-in has no signal {signature}")
        self.signal(name).connect(slot)

    def __getattr__(self, name):
        if name in SIGNALS:
            return self.signal(name)
        if name in PROPERTIES:
            return self._props.get(name)
        raise AttributeError(f"{self._class} stand-in has no attribute '{name}'")

    def __setattr__(self, name, value):
        if name not in PROPERTIES:
            raise AttributeError(f"{self._class} stand-in has no property '{name}'")
        old = self._props.get(name)
        self._props[name] = value
        if old == value:
            return
        if name == "currentPath":
            self.signal("currentPathChanged").emit(value)
        elif name == "checked":
            self.signal("stateChanged").emit(2 if value else 0)
            self.signal("toggled").emit(value)
        elif name == "value" and self._class in ("QSpinBox", "QSlider"):
            self.signal("valueChanged").emit(value)
        elif name == "currentIndex":
            self.signal("currentIndexChanged").emit(value)

    def click(self):
        self.signal("clicked").emit(False)

    def isVisible(self):
        return bool(self._props["visible"])

    # layouts and scenes
    def setMRMLScene(self, scene):
        for child in self._children:
            child.setMRMLScene(scene)

    def addWidget(self, widget):
        self._children.append(widget)

    def layout(self):
        return self

    def setRange(self, low, high):
        self._props["minimum"], self._props["maximum"] = low, high

    setMinimum = lambda self, v: self._props.__setitem__("minimum", v)  # noqa: E731
    setMaximum = lambda self, v: self._props.__setitem__("maximum", v)  # noqa: E731

    # QComboBox
    def addItem(self, text, data=None):
        self._items.append((text, data))
        if self._props["currentIndex"] < 0:
            self.currentIndex = 0

    def clear(self):
        self._items.clear()
        self._props["currentIndex"] = -1

    @builtins.property
    def currentData(self):
        i = self._props["currentIndex"]
        return self._items[i][1] if 0 <= i < len(self._items) else None

    @builtins.property
    def currentText(self):
        i = self._props["currentIndex"]
        return self._items[i][0] if 0 <= i < len(self._items) else ""

    def count(self):
        return len(self._items)

    def itemTexts(self):
        return [t for t, _ in self._items]

    # qMRMLNodeComboBox / qMRMLTableView
    def currentNode(self):
        return self._node

    def setCurrentNode(self, node):
        if node is not self._node:
            object.__setattr__(self, "_node", node)
            self.signal("currentNodeChanged").emit(node)

    def setMRMLTableNode(self, node):
        object.__setattr__(self, "_node", node)

    # QTableWidget
    def setRowCount(self, n):
        del self._items[n:]
        self._items.extend([{} for _ in range(n - len(self._items))])

    def rowCount(self):
        return len(self._items)

    def insertRow(self, row):
        self._items.insert(row, {})

    def setItem(self, row, col, item):
        self._items[row][col] = item

    def item(self, row, col):
        return self._items[row].get(col)

    def currentRow(self):
        return self._current_row

    def setCurrentCell(self, row, col):
        object.__setattr__(self, "_current_row", row)


def widgets_from_ui(path) -> Widget:
    """The widget tree of a Qt Designer file (layouts flattened into their widgets), with dynamic properties."""

    def build(element) -> Widget:
        dynamic = {p.get("name"): (p.find("string").text if p.find("string") is not None else None)
                   for p in element.findall("property") if p.get("stdset") == "0"}
        widget = Widget(element.get("class"), element.get("name"), dynamic)
        for item_text in element.findall("./item/property/string"):
            widget.addItem(item_text.text)
        text = element.find("./property[@name='text']/string")
        if text is not None and text.text:
            widget._props["text"] = text.text
        for child in _child_widgets(element):
            widget._children.append(build(child))
        return widget

    return build(ET.parse(path).getroot().find("widget"))


def _child_widgets(element):
    for sub in element:
        if sub.tag == "widget":
            yield sub
        elif sub.tag in ("layout", "item"):
            yield from _child_widgets(sub)


# ---- qt ------------------------------------------------------------------------------------------------------------

class QTimer:
    pending: list = []  # single shots waiting for the "event loop" (process_events)

    def __init__(self):
        self.timeout = Signal()
        self._active = False
        self._single = False
        self._interval = 0

    def setInterval(self, ms):
        self._interval = ms

    def interval(self):
        return self._interval

    def setSingleShot(self, single):
        self._single = single

    def start(self, *args):
        self._active = True

    def stop(self):
        self._active = False

    def isActive(self):
        return self._active

    def fire(self):
        """What the event loop does when the interval has passed."""
        if self._active:
            if self._single:
                self._active = False
            self.timeout.emit()

    @staticmethod
    def singleShot(ms, slot):
        QTimer.pending.append(slot)


class QTableWidgetItem:
    def __init__(self, text=""):
        self._text = text

    def text(self):
        return self._text


class QFile:
    ReadOnly = 1

    def __init__(self, path):
        self.path = str(path)

    def exists(self):
        import os

        return os.path.exists(self.path)

    def open(self, mode):
        return True


class QUiLoader:
    def load(self, qfile):
        return widgets_from_ui(qfile.path)


def make_qt():
    qt = types.ModuleType("qt")
    qt.QTimer = QTimer
    qt.QTableWidgetItem = QTableWidgetItem
    qt.QFile = QFile
    qt.QUiLoader = QUiLoader
    qt.QIcon = lambda *a: None
    qt.Qt = types.SimpleNamespace(WaitCursor=3)
    qt.QTimer.pending = []
    return qt


# ---- slicer.app and the scripted-module base classes -----------------------------------------------------------

class App:
    majorVersion, minorVersion = 5, 8
    applicationName = "Slicer"

    def __init__(self):
        self.connections = []
        self.cursor_depth = 0
        self.windows = []  # top-level widgets; a visible qSlicerMainWindow means Slicer has started

    def testingEnabled(self):
        return True

    def connect(self, signal, slot):
        self.connections.append((signal, slot))

    def setOverrideCursor(self, cursor):
        self.cursor_depth += 1

    def restoreOverrideCursor(self):
        self.cursor_depth -= 1

    def topLevelWidgets(self):
        return list(self.windows)

    def layoutManager(self):
        return None

    def processEvents(self):
        pass


def make_scripted_module(scene_getter):
    mod = types.ModuleType("slicer.ScriptedLoadableModule")

    class ScriptedLoadableModule:
        def __init__(self, parent):
            self.parent = parent

    class ScriptedLoadableModuleWidget:
        def __init__(self, parent=None):
            self.parent = parent if parent is not None else Widget("qSlicerScriptedLoadableModuleWidget", "module")
            self.parent._props["isEntered"] = False
            self.layout = self.parent.layout()
            self.moduleName = type(self).__name__[: -len("Widget")]

        def setup(self):
            pass

    class ScriptedLoadableModuleLogic:
        def __init__(self, parent=None):
            self.moduleName = type(self).__name__[: -len("Logic")]

        def getParameterNode(self):
            scene = scene_getter()
            node = scene.GetSingletonNode(self.moduleName, "vtkMRMLScriptedModuleNode")
            if node is None:
                import slicer

                node = slicer.vtkMRMLScriptedModuleNode()
                node.SetName(scene.GenerateUniqueName(self.moduleName))
                node.SetAttribute("ModuleName", self.moduleName)
                node.SetSingletonTag(self.moduleName)
                node = scene.AddNode(node)
            return node

    class ScriptedLoadableModuleTest(unittest.TestCase):
        def delayDisplay(self, message, msec=None):
            print(message)

    mod.ScriptedLoadableModule = ScriptedLoadableModule
    mod.ScriptedLoadableModuleWidget = ScriptedLoadableModuleWidget
    mod.ScriptedLoadableModuleLogic = ScriptedLoadableModuleLogic
    mod.ScriptedLoadableModuleTest = ScriptedLoadableModuleTest
    return mod


# ---- slicer.parameterNodeWrapper -----------------------------------------------------------------------------------

def make_parameter_node_wrapper():
    import slicer

    mod = types.ModuleType("slicer.parameterNodeWrapper")

    class Choice:
        def __init__(self, choices):
            self.choices = list(choices)

        def validate(self, value):
            if value not in self.choices:
                raise ValueError(f"{value!r} is not one of {self.choices}")

    class WithinRange:
        def __init__(self, minimum, maximum):
            self.minimum, self.maximum = minimum, maximum

        def validate(self, value):
            if not self.minimum <= value <= self.maximum:
                raise ValueError(f"{value} is not within [{self.minimum}, {self.maximum}]")

    class GuiConnector:
        def __init__(self):
            self._callback = None

        def onChanged(self, callback):
            self._callback = callback
            if callback is None:
                self._disconnect()
            else:
                self._connect()

        def changed(self, *args):
            if self._callback:
                self._callback()

    registered = []

    def parameterNodeGuiConnector(cls):
        registered.append(cls)
        return cls

    class _Simple(GuiConnector):
        """The built-in connectors SemiSeg's .ui needs: combo box (Choice), check box, spin box, node combo box."""

        def __init__(self, widget, base, annotations):
            super().__init__()
            self._widget, self._base = widget, base
            kind = widget.className()
            choice = next((a for a in annotations if isinstance(a, Choice)), None)
            if kind == "QComboBox" and choice is not None:
                widget.clear()
                for c in choice.choices:
                    widget.addItem(str(c))
                self._choices, self._signal = choice.choices, "currentIndexChanged"
            elif kind == "QCheckBox" and base is bool:
                self._signal = "stateChanged"
            elif kind == "QSpinBox" and base is int:
                self._signal = "valueChanged"
            elif kind == "qMRMLNodeComboBox" and isinstance(base, type) and issubclass(base, slicer.vtkMRMLNode):
                self._signal = "currentNodeChanged"
            else:
                raise RuntimeError(f"Unable to create GUI connector from datatype '{base}' to widget type "
                                   f"'{kind}'")

        def _connect(self):
            self._widget.signal(self._signal).connect(self.changed)

        def _disconnect(self):
            self._widget.signal(self._signal).disconnect(self.changed)

        def read(self):
            kind = self._widget.className()
            if kind == "QComboBox":
                return self._choices[self._widget.currentIndex]
            if kind == "QCheckBox":
                return self._widget.checked
            if kind == "QSpinBox":
                return self._widget.value
            return self._widget.currentNode()

        def write(self, value):
            kind = self._widget.className()
            if kind == "QComboBox":
                self._widget.currentIndex = self._choices.index(value)
            elif kind == "QCheckBox":
                self._widget.checked = value
            elif kind == "QSpinBox":
                self._widget.value = value
            else:
                self._widget.setCurrentNode(value)

    def _split(hint):
        if typing.get_origin(hint) is typing.Annotated:
            base, *annotations = typing.get_args(hint)
            return base, annotations
        return hint, []

    def _is_node(base):
        return isinstance(base, type) and issubclass(base, slicer.vtkMRMLNode)

    def parameterNodeWrapper(cls):
        hints = typing.get_type_hints(cls, globalns=vars(sys.modules[cls.__module__]), include_extras=True)
        fields = {}
        for name, hint in hints.items():
            base, annotations = _split(hint)
            default = cls.__dict__.get(name, None if _is_node(base) else base())
            fields[name] = (base, annotations, hint, default)

        class Wrapper:
            _fields = fields

            def __init__(self, node):
                object.__setattr__(self, "parameterNode", node)
                object.__setattr__(self, "_guis", {})
                for name, (base, _a, _h, default) in fields.items():
                    if not node.HasParameter(name):
                        self._write(name, default)

            def __bool__(self):
                return self.parameterNode is not None

            def _write(self, name, value):
                base, annotations, _h, _d = fields[name]
                for a in annotations:
                    a.validate(value)
                node = self.parameterNode
                if _is_node(base):
                    node.SetParameter(name, "")
                    node.SetNodeReferenceID(name, value.GetID() if value is not None else None)
                elif base is bool:
                    node.SetParameter(name, "True" if value else "False")
                else:
                    node.SetParameter(name, str(value))

            def __getattr__(self, name):
                if name not in fields:
                    raise AttributeError(f"{cls.__name__} has no parameter '{name}'")
                base = fields[name][0]
                node = self.parameterNode
                if _is_node(base):
                    return node.GetNodeReference(name)
                raw = node.GetParameter(name)
                return raw == "True" if base is bool else base(raw)

            def __setattr__(self, name, value):
                if name not in fields:
                    raise AttributeError(f"{cls.__name__} has no parameter '{name}'")
                self._write(name, value)

            def connectGui(self, ui):
                connectors = {}
                for widget in vars(ui).values():
                    pname = widget.property("SlicerParameterName") if isinstance(widget, Widget) else None
                    if not pname:
                        continue
                    base, annotations, hint, _d = fields[pname]
                    connector = next((c.create(widget, hint) for c in registered if c.canRepresent(widget, hint)),
                                     None) or _Simple(widget, base, annotations)
                    connectors[pname] = connector
                state = {"busy": False}

                def to_gui(*_):
                    if state["busy"]:
                        return
                    state["busy"] = True
                    try:
                        for pname, connector in connectors.items():
                            connector.write(getattr(self, pname))
                    finally:
                        state["busy"] = False

                def from_gui(pname, connector):
                    def update():
                        if not state["busy"]:
                            state["busy"] = True
                            try:
                                self._write(pname, connector.read())
                            finally:
                                state["busy"] = False
                    return update

                to_gui()
                for pname, connector in connectors.items():
                    connector.onChanged(from_gui(pname, connector))
                tag = self.parameterNode.AddObserver("ModifiedEvent", to_gui)
                self._guis[tag] = connectors
                return tag

            def disconnectGui(self, tag):
                for connector in self._guis.pop(tag, {}).values():
                    connector.onChanged(None)
                self.parameterNode.RemoveObserver(tag)

        Wrapper.__name__ = cls.__name__
        return Wrapper

    mod.parameterNodeWrapper = parameterNodeWrapper
    mod.parameterNodeGuiConnector = parameterNodeGuiConnector
    mod.GuiConnector = GuiConnector
    mod.Choice = Choice
    mod.WithinRange = WithinRange
    return mod


def make_i18n():
    mod = types.ModuleType("slicer.i18n")
    mod.tr = lambda text: text
    mod.translate = lambda context, text: text
    return mod


class Installed:
    """The stand-in in place: ``qt`` and the slicer submodules in sys.modules, ``slicer.app``/``mrmlScene`` set."""

    NAMES = ("qt", "slicer.ScriptedLoadableModule", "slicer.parameterNodeWrapper", "slicer.i18n", "SemiSeg")

    def __init__(self, scene):
        import slicer

        self.slicer = slicer
        self.scene = scene
        self.app = App()
        self.qt = make_qt()
        self._saved_modules = {n: sys.modules.get(n) for n in self.NAMES}
        self._saved_attrs = {n: getattr(slicer, n, None) for n in ("app", "mrmlScene", "ScriptedLoadableModule",
                                                                  "parameterNodeWrapper", "i18n")}
        modules = {"qt": self.qt, "slicer.ScriptedLoadableModule": make_scripted_module(lambda: slicer.mrmlScene),
                   "slicer.i18n": make_i18n()}
        sys.modules.update(modules)
        slicer.app, slicer.mrmlScene = self.app, scene
        sys.modules["slicer.parameterNodeWrapper"] = make_parameter_node_wrapper()
        slicer.ScriptedLoadableModule = modules["slicer.ScriptedLoadableModule"]
        slicer.parameterNodeWrapper = sys.modules["slicer.parameterNodeWrapper"]
        slicer.i18n = modules["slicer.i18n"]
        sys.modules.pop("SemiSeg", None)

    def process_events(self):
        """Run the single shots queued so far (what the event loop would do)."""
        while self.qt.QTimer.pending:
            self.qt.QTimer.pending.pop(0)()

    def remove(self):
        for name, module in self._saved_modules.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module
        for name, value in self._saved_attrs.items():
            if value is None:
                if hasattr(self.slicer, name):
                    delattr(self.slicer, name)
            else:
                setattr(self.slicer, name, value)


def open_widget(installed: Installed):
    """Import SemiSeg.py, create the module and its widget as Slicer does, set it up and enter it."""
    import SemiSeg

    module_parent = types.SimpleNamespace()
    SemiSeg.SemiSeg(module_parent)
    widget = SemiSeg.SemiSegWidget()
    widget.setup()
    widget.parent._props["isEntered"] = True
    widget.enter()
    return SemiSeg, widget
