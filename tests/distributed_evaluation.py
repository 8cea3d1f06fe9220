"""Evaluate a checkpoint on a CSV set as train.py does under torchrun: every process detects on its share of the
images, the first gathers them all and prints the mAP. Run by test_train.py with one process and with two.

    torchrun --nproc_per_node=2 tests/distributed_evaluation.py CHECKPOINT VAL_CSV CLASSES_CSV
"""

import sys

from retinanet.checkpoint import load_model
from retinanet.dataloader import CSVDataset, build_transform
from retinanet.evaluation import check_class_names, evaluate, gather_predictions, predict_dataset
from retinanet.training import setup_distributed

if __name__ == "__main__":
    checkpoint, val_csv, classes_csv = sys.argv[1:]
    device, rank, world_size = setup_distributed("cpu")
    model, class_names = load_model(checkpoint, device)
    dataset = CSVDataset(val_csv, classes_csv, build_transform(False, model.settings.min_size, model.settings.max_size))
    check_class_names(class_names, dataset.class_names)
    shard = predict_dataset(model, dataset, batch_size=2, workers=1, rank=rank, world_size=world_size)
    predictions = gather_predictions(shard, rank, world_size)
    if rank == 0:
        print(f"evaluated mAP {evaluate(predictions, dataset)['mAP']!r}")
