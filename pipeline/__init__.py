"""The SORS pipeline: Ray Train/Tune sweeps, Ray evaluation fan-out, the Parquet store, MLflow tracking,
reports, the nightly regression and the ``sors`` command line (layers: ``sors`` <- ``tasks`` <- ``pipeline``)."""
