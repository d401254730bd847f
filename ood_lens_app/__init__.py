"""The ood-lens dashboard's logic, importable and unit-testable without Streamlit running.

``app.py`` builds the navigation over the page files in ``views/`` (UI only: layout and calls
into this package). Modules:

* :mod:`~ood_lens_app.state` - session-state keys and their defaults (from
  :func:`ood_core.config.example_config`);
* :mod:`~ood_lens_app.loaders` - source-policy-checked, cached model / dataset loading, the
  bundled model list, layer tables, test predictions;
* :mod:`~ood_lens_app.errors` - which errors are the user's, and the messages pages show;
* :mod:`~ood_lens_app.sources` - choosing the model and the InD data (what the inputs ask for,
  applying a choice);
* :mod:`~ood_lens_app.layers` - layer choices: quick picks, what a score may read, per-score
  defaults, the Layers page's selection;
* :mod:`~ood_lens_app.widgets` - widget values derived from ``Param`` descriptions, and the
  widgets generated from them;
* :mod:`~ood_lens_app.form` - form values to a :class:`~ood_core.config.RunConfig`, with the
  problems found per score / scenarios / metrics;
* :mod:`~ood_lens_app.estimates` - pre-flight resource estimates beside each chosen score;
* :mod:`~ood_lens_app.runs` - run, replay an uploaded config, export a result;
* :mod:`~ood_lens_app.run_store` - the saved runs (bundles), their names, delete with undo;
* :mod:`~ood_lens_app.run_folders` - run stores and bundles opened from another folder;
* :mod:`~ood_lens_app.compare` - two runs paired by score identity, and what changed;
* :mod:`~ood_lens_app.study` - sweeps over layers and parameter values: best and margins;
* :mod:`~ood_lens_app.result_views` - what the Results page shows: threshold explorer state,
  metric table, galleries and histogram selections, heatmap, image captions;
* :mod:`~ood_lens_app.view_url` - the Results view (tab, explorer score and threshold) in the
  URL, read back after a reload;
* :mod:`~ood_lens_app.in_flight` - the process's Runs in progress, so a page reloaded during a
  Run learns what became of it;
* :mod:`~ood_lens_app.layout` - the page registry, error guard, header, links, sidebar.
"""
