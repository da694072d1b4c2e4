//! FIRST's batch function (`chunked_vllm_inference_function`) as the stand-in runs it: reads
//! the JSONL input file from the (simulated facility's) file system, answers every line with
//! the simulated model, writes `<output>/<base>_<model>_<batch_id>/<base>_<ts>.results.jsonl`
//! and a `.progress.json` beside it, and returns a summary as a JSON string. Like the real
//! function it refuses what it cannot run: a missing `input_file` or `model`, a file that is
//! not there, a line that is not a request.

use super::{python_json, traceback, Shared};
use serde_json::{json, Value};
use std::path::PathBuf;

pub(super) async fn run(s: &Shared, arg: &Value) -> Result<Value, String> {
    let params = &arg["model_params"];
    let need = |k: &str| {
        params[k]
            .as_str()
            .filter(|v| !v.is_empty())
            .map(str::to_owned)
            .ok_or_else(|| traceback(&format!("KeyError: '{k}'")))
    };
    let (input, model) = (need("input_file")?, need("model")?);
    let batch_id = arg["batch_id"].as_str().unwrap_or("batch").to_string();
    let out_root = params["output_folder_path"]
        .as_str()
        .map(PathBuf::from)
        .or_else(|| s.compute.seed.batch_results_dir.clone())
        .unwrap_or_else(std::env::temp_dir);
    let text = tokio::fs::read_to_string(&input).await.map_err(|e| {
        traceback(&format!(
            "FileNotFoundError: [Errno 2] No such file or directory: '{input}' ({e})"
        ))
    })?;
    let base = std::path::Path::new(&input)
        .file_stem()
        .map_or("input".into(), |s| s.to_string_lossy().into_owned());
    let dir = out_root.join(format!("{base}_{}_{batch_id}", model.replace('/', "_")));
    let mut results = String::new();
    let mut lines = 0u64;
    for (i, raw) in text.lines().enumerate() {
        if raw.trim().is_empty() {
            continue;
        }
        let req: Value = serde_json::from_str(raw).map_err(|e| {
            traceback(&format!(
                "json.decoder.JSONDecodeError: line {}: {e}",
                i + 1
            ))
        })?;
        let max = req["body"]["max_tokens"].as_u64().unwrap_or(16).min(64);
        let content: String = (0..max).map(|t| format!("tok{t} ")).collect();
        let answer = json!({
            "id": format!("vllm-{batch_id}-{i}"), "custom_id": req["custom_id"],
            "response": {"status_code": 200, "request_id": format!("vllm-batch-{i}"), "body": {
                "id": format!("chatcmpl-{batch_id}-{i}"), "object": "chat.completion", "model": model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": content},
                             "finish_reason": "length"}],
                "usage": {"prompt_tokens": 5, "completion_tokens": max, "total_tokens": 5 + max}}},
            "error": null,
        });
        results.push_str(&answer.to_string());
        results.push('\n');
        lines += 1;
    }
    let ts = super::now_f() as u64;
    let results_file = dir.join(format!("{base}_{ts}.results.jsonl"));
    let progress_file = dir.join(format!("{base}_{ts}.progress.json"));
    let write = async {
        tokio::fs::create_dir_all(&dir).await?;
        tokio::fs::write(&results_file, results).await?;
        let progress = json!({"total_lines": lines, "completed_lines": lines, "chunks_done": 1});
        tokio::fs::write(&progress_file, progress.to_string()).await
    };
    write
        .await
        .map_err(|e| traceback(&format!("PermissionError: {} ({e})", dir.display())))?;
    let summary = json!({
        "status": "completed", "batch_id": batch_id, "model": model, "input_file": input,
        "results_file": results_file.display().to_string(),
        "progress_file": progress_file.display().to_string(),
        "total_lines": lines, "completed_lines": lines, "failed_lines": 0,
    });
    Ok(Value::String(python_json(&summary)))
}
