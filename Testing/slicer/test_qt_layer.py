"""Checks of the Qt layer that need no Slicer application: the .ui, the widget names and parameter names the
module uses, the CMake lists, the requirements and the resource lookup from a source checkout."""
import ast
import re
import xml.etree.ElementTree as ET

from conftest import REPO

MODULE = REPO / "SemiSegExtension" / "SemiSeg.py"
UI = REPO / "Resources" / "UI" / "SemiSeg.ui"


def _ui_widgets():
    return {w.get("name"): w for w in ET.parse(UI).getroot().iter("widget")}


def test_ui_parses_and_has_every_widget_the_module_touches():
    widgets = _ui_widgets()
    used = set(re.findall(r"self\.ui\.(\w+)", MODULE.read_text()))
    assert used, "the module should use its .ui"
    assert not used - set(widgets), f"missing in {UI.name}: {sorted(used - set(widgets))}"


def _parameter_fields():
    tree = ast.parse(MODULE.read_text())
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "SemiSegParameterNode")
    return {s.target.id for s in cls.body if isinstance(s, ast.AnnAssign)}


def test_ui_parameter_bindings_match_the_parameter_node():
    bound = {}
    for name, w in _ui_widgets().items():
        for p in w.findall("property"):
            if p.get("name") == "SlicerParameterName":
                bound[name] = p.find("string").text
    fields = _parameter_fields()
    assert set(bound.values()) <= fields, sorted(set(bound.values()) - fields)
    assert len(set(bound.values())) == len(bound), "two widgets bound to one parameter"
    # every parameter is either bound to a widget or read by the widget code
    unbound = fields - set(bound.values())
    text = MODULE.read_text()
    assert all(f"p.{f}" in text or f"_parameterNode.{f}" in text for f in unbound), unbound


def _cmake_list(text, name):
    m = re.search(r"set\(" + name + r"\s+(.*?)\)", text, re.S)
    return [t for t in m.group(1).split() if not t.startswith("#")]


def test_cmake_lists_every_python_file_and_resource():
    cmake = (REPO / "SemiSegExtension" / "CMakeLists.txt").read_text()
    scripts = {s.replace("${MODULE_NAME}", "SemiSeg") for s in _cmake_list(cmake, "MODULE_PYTHON_SCRIPTS")}
    on_disk = {p.relative_to(REPO / "SemiSegExtension").as_posix()
               for p in (REPO / "SemiSegExtension").rglob("*.py") if "__pycache__" not in p.parts}
    assert scripts == on_disk
    resources = [r.replace("${MODULE_NAME}", "SemiSeg") for r in _cmake_list(cmake, "MODULE_PYTHON_RESOURCES")]
    assert {"Resources/UI/SemiSeg.ui", "Resources/Icons/SemiSeg.png", "Resources/requirements.txt"} <= set(resources)
    assert all((REPO / r).exists() for r in resources)
    assert "WITH_GENERIC_TESTS" in cmake and "slicerMacroBuildScriptedModule" in cmake
    top = (REPO / "CMakeLists.txt").read_text()
    for key in ("EXTENSION_HOMEPAGE", "EXTENSION_CATEGORY", "EXTENSION_CONTRIBUTORS", "EXTENSION_DESCRIPTION",
                "EXTENSION_ICONURL", "EXTENSION_SCREENSHOTURLS", "EXTENSION_DEPENDS", "find_package(Slicer",
                "add_subdirectory(SemiSegExtension)", "Slicer_EXTENSION_GENERATE_CONFIG", "Slicer_EXTENSION_CPACK"):
        assert key in top, key


def test_requirements_use_lower_bounds_only():
    from packaging.requirements import Requirement

    from SemiSegLib import dependencies

    reqs = [Requirement(r) for r in dependencies.read_requirements()]
    assert reqs and all(all(s.operator == ">=" for s in r.specifier) for r in reqs)
    assert "torch" not in {r.name for r in reqs}  # torch comes through PyTorchUtils
    assert dependencies.missing_packages() == []  # this environment has everything


def test_resources_found_from_a_source_checkout():
    from SemiSegLib import dependencies

    assert dependencies.resources_dir() == REPO / "Resources"
    assert dependencies.resource_path("Icons/SemiSeg.png").exists()


def test_module_imports_nothing_heavy_at_file_level():
    """Slicer loads the module at startup: only bundled packages may be imported at file level."""
    tree = ast.parse(MODULE.read_text())
    top = set()
    for node in tree.body:
        if isinstance(node, ast.Import):
            top |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            top.add((node.module or "").split(".")[0])
    assert top <= {"__future__", "os", "pathlib", "shutil", "tempfile", "typing", "qt", "slicer", "vtk",
                   "SemiSegLib"}, top


def test_segment_editor_effect_is_where_the_module_registers_it():
    """Slicer instantiates the class named after the effect's file; the module registers that file."""
    effect = REPO / "SemiSegExtension" / "SemiSegLib" / "SegmentEditorSAMEffect.py"
    classes = [n.name for n in ast.parse(effect.read_text()).body if isinstance(n, ast.ClassDef)]
    assert effect.stem in classes
    assert '"SemiSegLib" / "SegmentEditorSAMEffect.py"' in MODULE.read_text()
