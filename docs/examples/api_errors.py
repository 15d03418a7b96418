import keel

try:
    keel.run("tiny", data__name=None, data__path="reviews.csv")
except keel.KeelError as e:  # RecipeError, DataError, CheckpointError, GateError: the CLI's one line
    print(f"error: {e}")
