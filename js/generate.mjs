// Generate from an `llmopt export onnx` folder with Transformers.js in Node, offline.
//
//   node js/generate.mjs MODEL_DIR "prompt" [max_new_tokens=64] [dtype=fp32|q8|q4]
//
// The folder is what `llmopt export onnx --out MODEL_DIR` writes: config.json, tokenizer.json, ...
// and onnx/model.onnx (fp32), onnx/model_quantized.onnx (q8), onnx/model_q4.onnx (q4).
// Greedy decoding of exactly max_new_tokens tokens (end-of-text is not allowed to stop it early),
// so the tokens can be compared with Python's `model.generate(..., do_sample=False)`.
// Prints one JSON line: {dtype, prompt, prompt_ids, generated_ids, text, seconds, tokens_per_s}.
import path from 'node:path';
import { pipeline, env } from '@huggingface/transformers';

const [dir, prompt, maxNew = '64', dtype = 'fp32'] = process.argv.slice(2);
if (!dir || prompt === undefined) {
    console.error('usage: node generate.mjs MODEL_DIR "prompt" [max_new_tokens] [fp32|q8|q4]');
    process.exit(2);
}

// Local files only: a model name is a folder under env.localModelPath, never a Hub download.
env.allowRemoteModels = false;
env.allowLocalModels = true;
env.localModelPath = path.dirname(path.resolve(dir));
const generator = await pipeline('text-generation', path.basename(path.resolve(dir)), { dtype });

const n = Number(maxNew);
const greedy = { do_sample: false, max_new_tokens: n, min_new_tokens: n };

// 1. The pipeline: text in, text out. It puts <|endoftext|> in front of the prompt, as Python's
//    tokenizer does and as the model was trained, because the export's tokenizer_config.json says
//    add_bos_token (without it the pipeline adds no special tokens and the model sees another prompt).
const [{ generated_text: text }] = await generator(prompt, { ...greedy, return_full_text: false });

// 2. The same generation one level down, to see the token ids: the pipeline's tokenizer and model.
//    (Timed here: the pipeline call above has warmed the ONNX session up.)
const inputs = generator.tokenizer(prompt);
const t0 = performance.now();
const output = await generator.model.generate({ ...inputs, ...greedy });
const seconds = (performance.now() - t0) / 1000;

const promptIds = inputs.input_ids.tolist()[0].map(Number);       // int64 tensors hold BigInts
const generatedIds = output.tolist()[0].map(Number).slice(promptIds.length);
console.log(JSON.stringify({
    dtype, prompt, prompt_ids: promptIds, generated_ids: generatedIds, text,
    seconds: +seconds.toFixed(4), tokens_per_s: +(generatedIds.length / seconds).toFixed(1),
}));
await generator.dispose();
