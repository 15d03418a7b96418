import keel

run = keel.load("runs/tiny")  # the folder keel.run made (run.dir)
print(run.evaluate()["macro_f1"])  # the test split; run.evaluate("labelled.csv") scores a file

explanation = run.explain(["what a lovely ride"], steps=16)[0]
print(explanation.label, list(zip(explanation.tokens, explanation.attributions)))

figures = run.export()  # export/onnx and export/onnx-int8, each checked against PyTorch
print(figures["onnx-int8"]["logit_cosine_vs_eager"])
print(run.predict(["what a lovely ride"], backend="onnx-int8"))
