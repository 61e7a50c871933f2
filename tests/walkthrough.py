"""The walkthrough's tokenization (seed chapter 3), kept faithfully as a reference for differential tests."""

from __future__ import annotations

from kotune.data.templates import KO_ALPACA

TEMPLATE = {"prompt_input": KO_ALPACA.prompt_input, "prompt_no_input": KO_ALPACA.prompt_no_input}


def generate_prompt(instruction, input=None, label=None):
    if input:
        res = TEMPLATE["prompt_input"].format(instruction=instruction, input=input)
    else:
        res = TEMPLATE["prompt_no_input"].format(instruction=instruction)
    if label:
        res = f"{res}{label}"
    return res


def make_generate_and_tokenize_prompt(tokenizer, cut_off_len=4098, train_on_inputs=False, add_eos_token=False):
    """The seed's ``tokenize`` + ``generate_and_tokenize_prompt`` closed over a tokenizer and its settings."""

    def tokenize(prompt, add_eos_token=True):
        result = tokenizer(prompt, truncation=True, max_length=cut_off_len, padding=False, return_tensors=None)
        if (
            result["input_ids"][-1] != tokenizer.eos_token_id
            and len(result["input_ids"]) < cut_off_len
            and add_eos_token
        ):
            result["input_ids"].append(tokenizer.eos_token_id)
            result["attention_mask"].append(1)
        result["labels"] = result["input_ids"].copy()
        return result

    def generate_and_tokenize_prompt(data_point):
        full_prompt = generate_prompt(data_point["instruction"], data_point["input"], data_point["output"])
        tokenized_full_prompt = tokenize(full_prompt)
        if not train_on_inputs:
            user_prompt = generate_prompt(data_point["instruction"], data_point["input"])
            tokenized_user_prompt = tokenize(user_prompt, add_eos_token=add_eos_token)
            user_prompt_len = len(tokenized_user_prompt["input_ids"])
            if add_eos_token:
                user_prompt_len -= 1
            tokenized_full_prompt["labels"] = [-100] * user_prompt_len + tokenized_full_prompt["labels"][
                user_prompt_len:
            ]
        return tokenized_full_prompt

    return generate_and_tokenize_prompt
