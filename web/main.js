// Transformers.js from the npm package in ../js (its browser bundle), ONNX Runtime Web's WASM files
// from the same place: the page needs nothing from the internet. What fails is said on the page.
const $ = (id) => document.getElementById(id);
const params = new URLSearchParams(location.search);
const dtype = params.get("dtype") ?? "q4";                 // q4: model_q4.onnx, q8: model_quantized.onnx
const SETUP = "From the repository root: `llmopt export onnx --out web/models/tinypy` writes the model, " +
  "`make js/node_modules` installs Transformers.js; then reload this page.";

function showError(what, err, hint = "") {
  $("out").textContent = `${what} failed: ${err?.message ?? err}` + (hint && `\n\n${hint}`);
  $("out").dataset.error = "1";
}

let generator;
try {
  if (!["fp32", "q8", "q4"].includes(dtype)) throw new Error(`?dtype=${dtype}: use fp32, q8 or q4`);
  // imported here, not at the top, so that a missing js/node_modules is shown like any other failure
  const { pipeline, env } = await import("../js/node_modules/@huggingface/transformers/dist/transformers.min.js");
  env.allowRemoteModels = false;                              // never the Hugging Face hub
  env.allowLocalModels = true;
  env.localModelPath = params.get("models") ?? "./models/";  // ./models/tinypy/{config.json, onnx/...}
  env.backends.onnx.wasm.wasmPaths = new URL("../js/node_modules/onnxruntime-web/dist/", location.href).href;
  env.backends.onnx.wasm.numThreads = 1;                      // threads need cross-origin isolation headers
  generator = await pipeline("text-generation", params.get("model") ?? "tinypy", { dtype, device: "wasm" });
  $("go").textContent = `generate (${dtype})`;
  $("go").disabled = false;
} catch (err) {
  $("go").textContent = "the model did not load";
  showError("loading the model", err, SETUP);
}

$("go").onclick = async () => {
  $("go").disabled = true;
  delete $("out").dataset.error;
  $("stats").textContent = "";
  delete $("stats").dataset.tokensPerS;
  try {
    const prompt = $("prompt").value, maxNew = Number($("max").value);
    const t0 = performance.now();
    const [out] = await generator(prompt, { max_new_tokens: maxNew, do_sample: false, return_full_text: false });
    const seconds = (performance.now() - t0) / 1000;
    const n = generator.tokenizer.encode(out.generated_text, { add_special_tokens: false }).length;
    $("out").textContent = prompt + out.generated_text;
    $("stats").textContent = `${n} tokens in ${seconds.toFixed(2)} s: ${(n / seconds).toFixed(1)} tokens/s (${dtype}, WASM)`;
    $("stats").dataset.tokensPerS = (n / seconds).toFixed(2);
  } catch (err) {
    showError("generation", err);
  } finally {
    $("go").disabled = false;
  }
};
