"""Evaluation of pre-trained encoders: kNN, linear and attentive probes, fine-tuning."""
