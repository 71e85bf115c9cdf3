"""headstart: reproducible transfer learning for image classification on DVC.

Linear probe first, then fine-tune. Stage scripts live in stages/; the logic lives here.
"""

__version__ = "0.1.0"
