"""llp-pretrain: LLP language-model pretraining on DeepSpeed."""
