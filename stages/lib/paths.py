"""Every file and folder the stages read and write, relative to the project root: the one place the code
names them. dvc.yaml declares the same paths as outs (tests/test_stage_deps.py checks that they agree)."""
from pathlib import Path

RAW_DIR = Path("data/raw")                    # download: the data set's files as published
PREPARED_DIR = Path("data/prepared")          # preprocess: {train,val,test}.pt and meta.json

MODEL = Path("models/model.pt")               # train: the self-describing model file (stages/lib/modelfile.py)
CHECKPOINT = Path("models/checkpoint.pt")     # train: resume state after the last complete epoch
RUN_FILE = Path("models/mlflow_run.json")     # train: the MLflow run evaluate and export add to
LOG_DIR = Path("logs")                        # train: TensorBoard
TRAIN_METRICS = Path("metrics/train.json")    # train: rewritten after every epoch
TRAIN_HISTORY = Path("metrics/train_history.csv")
TRAIN_TIME = Path("metrics/train_time.json")  # speed, apart so that the other files are identical across reruns
TRAIN_ENV = Path("metrics/train_env.json")    # device, precision, threads: where it ran, not a metric

EVAL_METRICS = Path("metrics/eval.json")      # evaluate: the numbers experiments are compared by
PER_CLASS = Path("metrics/per_class.csv")
PREDICTIONS = Path("metrics/predictions.csv")  # one row per test image: the confusion plot, make flips

EXPORT_DIR = Path("models/export")            # export: state_dict.pt, model.onnx, MODEL_CARD.md
EXPORT_REPORT = Path("metrics/export.json")   # export: the ONNX check and file sizes

# Not an output: where train keeps its resume state while it runs (the checkpoint after each epoch and the
# TensorBoard logs so far), one folder per fingerprint of its settings and data. A failed or interrupted
# run leaves the outputs above as they were and this folder for the rerun to resume from. Git-ignored.
RESUME_DIR = Path(".resume")
