"""Gradio web demo of the dass package (``dass-demo`` or ``python app/app.py``)."""
