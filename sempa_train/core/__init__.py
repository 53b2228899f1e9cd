"""Infrastructure every stage uses: configs, files and datasets, models, stores, templates and text."""
