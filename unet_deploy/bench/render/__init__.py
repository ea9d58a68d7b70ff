"""A benchmark report for people: the terminal table and lines (:mod:`.table`), RESULTS.md (:mod:`.markdown`),
the PNG plot (:mod:`.plot`) and the JSON file (:mod:`.report_json`)."""
