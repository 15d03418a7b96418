// Classify texts with Transformers.js in Node (onnxruntime-node): the web export's parity check without a browser.
//   node web_classify.mjs RUNTIME_DIR MODEL_DIR DTYPE < texts.json > probabilities.json
// texts.json: a JSON list of strings; out: for each text, the probability of each label in id2label order.
import { readFileSync } from "node:fs";
import { join } from "node:path";
import { pathToFileURL } from "node:url";

const [runtime, modelDir, dtype] = process.argv.slice(2);
const entry = join(runtime, "node_modules", "@huggingface", "transformers", "dist", "transformers.node.mjs");
const { env, pipeline } = await import(pathToFileURL(entry).href);
env.allowRemoteModels = false;  // the export's own files or nothing
env.useFSCache = false;
const texts = JSON.parse(readFileSync(0, "utf8"));
// an absolute path is no hub model id: Transformers.js reads MODEL_DIR/config.json, MODEL_DIR/onnx/... from disk
const classifier = await pipeline("text-classification", modelDir, { dtype, device: "cpu", local_files_only: true });
const order = Object.values(classifier.model.config.id2label);
const out = [];
for (const text of texts) {  // one text per call: dynamic int8 quantizes a batch's activations with one scale
  let labels = await classifier([text], { top_k: null });
  if (Array.isArray(labels[0])) labels = labels[0];
  out.push(order.map((name) => labels.find((l) => l.label === name).score));
}
process.stdout.write(JSON.stringify(out));
