// Transformers.js from the npm package in ../js (its browser bundle), ONNX Runtime Web's WASM files
// from the same place: the page needs nothing from the internet.
import { pipeline, env } from "../js/node_modules/@huggingface/transformers/dist/transformers.min.js";

const params = new URLSearchParams(location.search);
const dtype = params.get("dtype") ?? "q4";                 // q4: model_q4.onnx, q8: model_quantized.onnx
env.allowRemoteModels = false;                              // never the Hugging Face hub
env.allowLocalModels = true;
env.localModelPath = params.get("models") ?? "./models/";  // ./models/tinypy/{config.json, onnx/...}
env.backends.onnx.wasm.wasmPaths = new URL("../js/node_modules/onnxruntime-web/dist/", location.href).href;
env.backends.onnx.wasm.numThreads = 1;                      // threads need cross-origin isolation headers

const $ = (id) => document.getElementById(id);
const generator = await pipeline("text-generation", params.get("model") ?? "tinypy", { dtype, device: "wasm" });
$("go").textContent = `generate (${dtype})`;
$("go").disabled = false;

$("go").onclick = async () => {
  $("go").disabled = true;
  const prompt = $("prompt").value, maxNew = Number($("max").value);
  const t0 = performance.now();
  const [out] = await generator(prompt, { max_new_tokens: maxNew, do_sample: false, return_full_text: false });
  const seconds = (performance.now() - t0) / 1000;
  const n = generator.tokenizer.encode(out.generated_text, { add_special_tokens: false }).length;
  $("out").textContent = prompt + out.generated_text;
  $("stats").textContent = `${n} tokens in ${seconds.toFixed(2)} s: ${(n / seconds).toFixed(1)} tokens/s (${dtype}, WASM)`;
  $("stats").dataset.tokensPerS = (n / seconds).toFixed(2);
  $("go").disabled = false;
};
