import keel

recipe = keel.load_recipe("tiny", train__epochs=1)  # a built-in recipe or a .yaml file, and overrides
run = keel.run(recipe)  # train, evaluate on the test split, write report.html
print(run.dir, run.metrics["accuracy"], run.metrics["baseline"]["accuracy"], run.report_path)

for p in run.predict(["what a lovely ride", "the bus broke down again"]):
    print(p["label"], round(p["score"], 3), p["scores"])
