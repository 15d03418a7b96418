"""Learning after deployment: `keel learn RUN_DIR` trains a challenger on the feedback a served run collected
(keel/serve/feedback.py) and promotes it only when it is better by a stated margin without forgetting."""
