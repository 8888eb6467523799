"""Evaluation: datasets, prompts to answers, scoring, one run, summaries, tables and plots, Ray pools."""
