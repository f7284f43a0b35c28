//! The docs stay true to the code: every error code and route is documented.

use serde_json::Value;

#[test]
fn api_md_lists_every_error_code_and_route() {
    let api_md = include_str!("../../docs/api.md");
    let openapi: Value = serde_json::from_str(include_str!("../../docs/openapi.json")).unwrap();
    for (path, item) in openapi["paths"].as_object().unwrap() {
        let documented = if item.get("post").is_some() {
            api_md.contains(&format!("| `{path}` |"))
        } else {
            api_md.contains(path.as_str())
        };
        assert!(documented, "docs/api.md does not document {path}");
    }
    let error_names: Vec<String> = openapi["paths"]["/send_msg"]["post"]["responses"]
        .as_object()
        .unwrap()
        .values()
        .filter_map(|r| r["description"].as_str())
        .flat_map(|d| d.trim_start_matches("Failure: ").split(", ").map(str::to_string).collect::<Vec<_>>())
        .collect();
    assert!(error_names.len() >= 13, "{error_names:?}");
    for entry in error_names {
        if entry == "Success" {
            continue;
        }
        // "40301 not_member (403)"
        let mut parts = entry.split(' ');
        let (number, name) = (parts.next().unwrap(), parts.next().unwrap());
        assert!(api_md.contains(&format!("| {number} | `{name}` |")), "docs/api.md lacks {number} {name}");
    }
}
