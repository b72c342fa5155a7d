"""Packaging is declared in setup.cfg; this file only ships ``fastusp_xdit_autoload.pth``.

The .pth file must land at the top of site-packages (Python runs ``import`` lines of .pth files found
there at every interpreter start). ``build_py`` puts it next to the packages, for wheels
(``pip install .``) and for PEP 660 editable installs (``pip install -e .``), whose wheel root is
``install_lib``.
"""
import os

from setuptools import setup
from setuptools.command.build_py import build_py

PTH = "fastusp_xdit_autoload.pth"


class build_py_with_pth(build_py):
    def run(self):
        super().run()
        root = self.get_finalized_command("install").install_lib if self.editable_mode else self.build_lib
        self.copy_file(os.path.join(os.path.dirname(os.path.abspath(__file__)), PTH), os.path.join(root, PTH))


setup(cmdclass={"build_py": build_py_with_pth})
