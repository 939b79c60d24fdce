"""Renderers: every way of showing a result (text, HTML, figures, widgets, progress).

Each module reads results and registers with the view registry, gpumagic.views; results never
import anything here. ipywidgets and matplotlib are imported inside functions only."""
