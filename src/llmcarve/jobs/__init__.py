"""What a DVC stage and a `llmcarve` command both run: one carve, one evaluation, one export.

The stages (stages/) read params.yaml and write the pipeline's artifacts; the command line (llmcarve.cli)
reads options and writes the directory it is given. Both call these functions, so a method behaves the
same either way. Nothing here talks to DVC, Prefect or MLflow.

    layout     where the pipeline keeps each model and its training blocks
    carve      static, ToMoE and ATP carving: train, convert, save a named model directory
    evaluate   perplexity, multiple-choice tasks, parameter accounting of one model
    export     ONNX export of one model, checked against PyTorch
"""
